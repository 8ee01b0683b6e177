"""Images are never lost, mixed or doubled by what a client, a third party or a slow master does:
forged `_distributed` fields, credentials read from a worker's queue, deliveries that cannot
finish, stale inputs on a worker and partial runs. A real master and two real workers on loopback."""
from __future__ import annotations

import json

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
                                               "token": "t", "master_url": live.master.url})
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
    # whatever the queue shows, used as a token, lets nobody deliver (here: no images for unit 2)
    for token in {visible.get("sealed"), visible.get("token")} - {None}:
        header = wire.Header(job["job_id"], "4", 2, token, "float32", (1, 8, 8, 3))
        frame = b"".join(bytes(p) for p in wire.encode(header, np.zeros((1, 8, 8, 3), np.float32)))
        resp = requests.post(live.master.url + "/distributed/result", data=frame, timeout=10)
        assert resp.status_code == 403, resp.text
    entry = live.master.wait_prompt(prompt_id, 120)
    assert error_of(entry) == ""
    assert blue_values(live.master.saved_images(entry, "5")) == [80, 81, 82]
    for worker in live.workers:
        assert "token" not in json.dumps([item["prompt"][2] for item in worker.get("/history").json().values()])


class _Busy:
    """A stand-in master that reads each result and answers 503 "retry later", forever."""

    def __init__(self):
        import http.server
        import threading

        busy = self
        self.posts = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                busy.posts += 1
                body = b'{"error": "the master holds its result budget for earlier jobs; retry later"}'
                self.send_response(503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def busy_master():
    busy = _Busy()
    yield busy
    busy.close()


def test_a_copy_of_a_worker_prompt_read_from_its_queue_can_neither_deliver_nor_learn_the_token(live, busy_master):
    """The attack: anyone may read a worker's GET /queue. A copy of the master's prompt found there,
    queued on that worker ahead of it ("front") with other images upstream, or with another master
    address to learn the token, must take nothing: the job ends with its own images only."""
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
    stolen = json.loads(json.dumps(queued))
    stolen["4"]["inputs"][FIELD] = json.dumps({**field_of(queued, "4"), "master_url": busy_master.url})
    # each queued at the front: the forged one, queued last, runs first
    copies = [worker.post("/prompt", {"prompt": p, "client_id": "outsider", "front": True}).json()["prompt_id"]
              for p in (stolen, forged)]
    entry = live.master.wait_prompt(owner, 120)
    assert error_of(entry) == ""
    assert blue_values(live.master.saved_images(entry, "5")) == [50, 51, 52]  # the job's own images only
    for copy in copies:
        assert "may not deliver" in error_of(worker.wait_prompt(copy, 60))
    assert busy_master.posts == 0  # the token never left the worker
    assert error_of(worker.wait_prompt(hold, 60)) == ""


def _dispatch(worker, master_url: str, timeout: float) -> str:
    """Queue on a worker the prompt a master would send it for unit 1."""
    from distributed_core import workflow
    fields = {"job": "j" * 32, "token": "t" * 32, "timeout": timeout, "master_url": master_url,
              "transport": "float32"}
    prompt = workflow.worker_prompt(image_workflow(seed=1, batch=1), ["4"], fields, [[1, 1]], [1])
    return worker.queue_prompt(prompt)


def test_delivery_to_a_busy_master_gives_up_at_the_deadline(live, busy_master):
    worker = live.workers[0]
    prompt_id = _dispatch(worker, busy_master.url, timeout=2)
    entry = worker.wait_prompt(prompt_id, 60)  # before: retried for as long as the master said 503
    assert "503" in error_of(entry) and busy_master.posts >= 1
    assert worker.idle()


def test_delivery_stops_when_the_worker_is_interrupted(live, busy_master):
    worker = live.workers[0]
    prompt_id = _dispatch(worker, busy_master.url, timeout=600)
    wait_until(lambda: busy_master.posts >= 2, 30, what="the worker to retry its delivery")
    assert worker.post("/interrupt", {}).status_code == 200
    entry = worker.wait_prompt(prompt_id, 30)  # before: the interrupt was ignored until the deadline
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
