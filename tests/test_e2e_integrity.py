"""Images are never lost, mixed or doubled by what a client, a third party or a slow master does:
forged `_distributed` fields, credentials read from a worker's queue, relays that never open, stale inputs on a worker and partial runs. A real master and two real workers on loopback."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import requests

from distributed_core import wire
from harness import blue_values, error_of, image_workflow, wait_until

pytestmark = pytest.mark.timeout(300)

FIELD = "_distributed"


def queued_prompts(instance) -> list[dict]:
    body = instance.get("/queue").json()
    return [item[2] for item in body["queue_running"] + body["queue_pending"]]


def field_of(prompt: dict, node_id: str) -> dict:
    return json.loads(prompt[node_id]["inputs"][FIELD])


def running_job(master) -> dict:
    return wait_until(lambda: master.get("/distributed/status").json()["jobs"], 30, what="a job to show")[0]


def test_a_client_cannot_take_another_jobs_images(live):
    owner = live.master.queue_prompt(image_workflow(seed=40, batch=1, seconds_per_image=1.5))
    job = running_job(live.master)
    forged = image_workflow(seed=70, batch=1)
    forged["4"]["inputs"][FIELD] = json.dumps({"job": job["job_id"], "role": "master", "collector": "4",
                                               "chunks": []})
    thief = live.master.queue_prompt(forged)
    owner_entry, thief_entry = live.master.wait_prompt(owner, 120), live.master.wait_prompt(thief, 120)
    assert error_of(owner_entry) == "" and error_of(thief_entry) == ""
    assert blue_values(live.master.saved_images(owner_entry, "5")) == [40, 41, 42]
    # the forged field was dropped: that prompt became a job of its own, with its own images
    assert blue_values(live.master.saved_images(thief_entry, "5")) == [70, 71, 72]
    assert field_of(thief_entry["prompt"][2], "4")["job"] != job["job_id"]


def test_a_prompt_mixing_worker_and_master_roles_is_refused(live):
    prompt = image_workflow(seed=1, batch=1)
    prompt["4"]["inputs"][FIELD] = json.dumps({"job": "x", "role": "worker", "collector": "4", "chunks": [[1, 1]],
                                               "token": "t"})
    prompt["6"] = {"class_type": "MultiGPUCollector",
                   "inputs": {"images": ["2", 0], FIELD: json.dumps({"job": "x", "role": "master"})}}
    for instance in (live.master, live.workers[0]):
        resp = instance.post("/prompt", {"prompt": prompt, "client_id": "tests"})
        assert resp.status_code == 400, resp.text
        message = resp.json()["error"]["message"]
        assert "MultiGPUCollector (node 6)" in message and "'master'" in message, message
        assert instance.idle()


def test_a_token_read_from_a_worker_delivers_nothing(live):
    for worker in live.workers:
        worker.post("/history", {"clear": True})
    prompt_id = live.master.queue_prompt(image_workflow(seed=80, batch=1, seconds_per_image=2.0))
    job = running_job(live.master)
    seen = wait_until(lambda: queued_prompts(live.workers[0]), 30, what="worker1's prompt")[0]
    visible = field_of(seen, "4")
    assert "token" not in visible, "the result token is readable in the worker's queue"
    # whatever the queue shows opens no relay to the worker's prompt: nobody can fetch its results
    # (or hand it leases) in the master's place, and the master takes results over no other way
    for key in {visible.get("sealed"), visible.get("token"), job["job_id"]} - {None}:
        resp = requests.get(live.workers[0].url + "/distributed/relay", headers={"X-Distributed-Share": key},
                            timeout=10)
        assert resp.status_code == 403, resp.text
    header = wire.Header(job["job_id"], "4", 2, visible.get("sealed") or "x", "float32", (1, 8, 8, 3))
    frame = b"".join(bytes(p) for p in wire.encode(header, np.zeros((1, 8, 8, 3), np.float32)))
    assert requests.post(live.master.url + "/distributed/result", data=frame, timeout=10,
                         headers=live.master.auth()).status_code in (404, 405)
    entry = live.master.wait_prompt(prompt_id, 120)
    assert error_of(entry) == ""
    assert blue_values(live.master.saved_images(entry, "5")) == [80, 81, 82]
    for worker in live.workers:
        assert "token" not in json.dumps([item["prompt"][2] for item in worker.get("/history").json().values()])


def test_a_copy_of_a_worker_prompt_read_from_its_queue_can_neither_deliver_nor_learn_the_token(live):
    """The attack: anyone may read a worker's GET /queue. A copy of the master's prompt found there,
    queued on that worker ahead of it ("front") as it is or with other images upstream, must take
    nothing: the job ends with its own images only."""
    worker = live.workers[0]
    # node ids of its own: ComfyUI of 2024 mixes up cached outputs of other classes under one id
    hold = worker.queue_prompt({"h1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8,
                                                                            "batch_size": 1, "color": 0}},
                                "h2": {"class_type": "DistributedTestProbe", "inputs": {
                                    "images": ["h1", 0], "seconds_per_image": 4.0, "label": "hold"}},
                                "h3": {"class_type": "PreviewImage", "inputs": {"images": ["h2", 0]}}})
    owner = live.master.queue_prompt(image_workflow(seed=50, batch=1))
    job = running_job(live.master)

    def genuine():
        pending = worker.get("/queue").json()["queue_pending"]
        return next((item for item in pending if "4" in item[2] and FIELD in item[2]["4"]["inputs"]), None)
    item = wait_until(genuine, 30, what="the master's prompt waiting on worker1")
    assert field_of(item[2], "4")["job"] == job["job_id"]
    # as queued (ComfyUI before mid-2024 writes each node's IS_CHANGED result, NaN here, into it)
    queued = {nid: {k: v for k, v in node.items() if k != "is_changed"} for nid, node in item[2].items()}
    forged = json.loads(json.dumps(queued))
    forged["2"]["inputs"]["color"] = 0xFF00FF  # other images
    stolen = json.loads(json.dumps(queued))  # as it is: it would take the master's relay
    # each queued at the front: the forged one, queued last, runs first
    copies = [worker.post("/prompt", {"prompt": p, "client_id": "outsider", "front": True}).json()["prompt_id"]
              for p in (stolen, forged)]
    entry = live.master.wait_prompt(owner, 120)
    assert error_of(entry) == ""
    assert blue_values(live.master.saved_images(entry, "5")) == [50, 51, 52]  # the job's own images only
    for copy in copies:
        assert "may not deliver" in error_of(worker.wait_prompt(copy, 60))
    assert error_of(worker.wait_prompt(hold, 60)) == ""


def _dispatch(worker, timeout: float) -> str:
    """Queue on a worker, by hand, the prompt a master would send it for unit 1: no master opens
    its relay."""
    from distributed_core import workflow
    fields = {"job": "j" * 32, "token": "t" * 32, "timeout": timeout, "transport": "float32"}
    prompt = workflow.worker_prompt(image_workflow(seed=1, batch=1), ["4"], fields, [[1, 1]], [1])
    return worker.queue_prompt(prompt)


def test_a_share_whose_master_never_opens_its_relay_gives_up_at_the_timeout(live):
    worker = live.workers[0]
    prompt_id = _dispatch(worker, timeout=2)
    message = error_of(worker.wait_prompt(prompt_id, 60))
    assert "did not open its relay" in message and "websockets" in message, message
    assert worker.idle()


def test_a_share_waiting_for_its_relay_stops_when_the_worker_is_interrupted(live):
    worker = live.workers[0]
    prompt_id = _dispatch(worker, timeout=600)
    wait_until(lambda: worker.get("/queue").json()["queue_running"], 30, what="the share to run")
    time.sleep(1.0)  # rendered: waiting for the relay now
    assert worker.post("/interrupt", {}).status_code == 200
    entry = worker.wait_prompt(prompt_id, 30)  # not at the 600 s timeout
    assert entry["status"]["status_str"] == "error"
    assert any(event == "execution_interrupted" for event, _data in entry["status"]["messages"])
    wait_until(worker.idle, 10, what="the worker to be idle")


def test_a_different_input_of_the_same_name_and_size_is_replaced(live):
    from PIL import Image

    def bmp(path, blue):  # BMP: the same size in bytes whatever the colour
        Image.fromarray(np.full((8, 8, 3), (10, 200, blue), np.uint8)).save(path, "BMP")
    bmp(live.master.dirs["input"] / "same-size.bmp", 30)
    for worker in live.workers:
        bmp(worker.dirs["input"] / "same-size.bmp", 31)
    assert all((w.dirs["input"] / "same-size.bmp").stat().st_size ==
               (live.master.dirs["input"] / "same-size.bmp").stat().st_size for w in live.workers)
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "same-size.bmp"}},
              "2": {"class_type": "MultiGPUCollector", "inputs": {"images": ["1", 0]}},
              "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "loaded"}}}
    entry = live.master.wait_prompt(live.master.queue_prompt(prompt), 120)
    assert error_of(entry) == ""
    assert blue_values(live.master.saved_images(entry, "3")) == [30, 30, 30]
    for worker in live.workers:
        assert (worker.dirs["input"] / "same-size.bmp").read_bytes() == \
            (live.master.dirs["input"] / "same-size.bmp").read_bytes()


def test_a_partial_run_outside_the_collector_dispatches_no_worker(live):
    for worker in live.workers:
        worker.post("/history", {"clear": True})
    prompt = image_workflow(seed=90, batch=1)
    prompt["8"] = {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 7}}
    prompt["9"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "alone"}}
    resp = live.master.post("/prompt", {"prompt": prompt, "client_id": "tests", "partial_execution_targets": ["9"]})
    assert resp.status_code == 200, resp.text
    entry = live.master.wait_prompt(resp.json()["prompt_id"], 120)
    assert error_of(entry) == ""
    if "partial_execution" in (live.tree / "execution.py").read_text():
        # this ComfyUI runs only node 9: nothing reaches the Collector, so no worker renders for it
        assert set(entry["outputs"]) == {"9"}
        assert all(not worker.get("/history").json() for worker in live.workers)
    else:
        # an older ComfyUI ignores the field and runs every output: then the Collector still gathers all
        assert blue_values(live.master.saved_images(entry, "5")) == [90, 91, 92]
    assert live.master.get("/distributed/status").json()["jobs"] == []
