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
