"""The master's HTTP API against a real ComfyUI: config, bad requests and the result route."""
from __future__ import annotations

import json

import numpy as np
import pytest
import requests

from distributed_core import wire
from harness import error_of, image_workflow

pytestmark = pytest.mark.timeout(300)


def test_config_round_trip_through_the_api(live):
    body = live.master.get("/distributed/config").json()
    assert body["error"] == "" and body["path"] == str(live.config_path)
    config = body["config"]
    config["settings"]["mode"] = "staggered"
    config["workers"][1]["enabled"] = False
    resp = live.master.post("/distributed/config", config)
    assert resp.status_code == 200, resp.text
    on_disk = json.loads(live.config_path.read_text())
    assert on_disk["settings"]["mode"] == "staggered" and on_disk["workers"][1]["enabled"] is False


@pytest.mark.parametrize("body, expect", [
    ({"workers": [{"port": 70000}]}, "workers[0].port"),
    ({"settings": {"mode": "warp"}}, "settings.mode"),
    ({"workers": [{"port": 9000, "extra_args": "--cpu && curl evil"}]}, "workers[0].extra_args"),
    ([1, 2], "config:"),
])
def test_bad_config_is_refused_with_the_field_named(live, body, expect):
    before = live.config_path.read_text()
    resp = live.master.post("/distributed/config", body)
    assert resp.status_code == 400
    assert expect in resp.json()["error"]
    assert live.config_path.read_text() == before


def test_malformed_and_oversized_bodies_get_4xx(live):
    resp = requests.post(live.master.url + "/distributed/config", data=b"{not json", timeout=10,
                         headers=live.master.auth())
    assert resp.status_code == 400 and "not valid JSON" in resp.json()["error"]
    resp = requests.post(live.master.url + "/distributed/config", data=b" " * (2 << 20), timeout=30,
                         headers=live.master.auth())
    assert resp.status_code == 413


def test_broken_config_file_keeps_comfyui_up(live):
    live.config_path.write_text("{ this is not json")
    body = live.master.get("/distributed/config").json()
    assert "not valid JSON" in body["error"]
    status = live.master.get("/distributed/status").json()
    assert "not valid JSON" in status["config_error"]
    assert live.config_path.read_text() == "{ this is not json"
    assert live.master.get("/system_stats").status_code == 200


def _frame(job="nope", unit=1, token="t", shape=(1, 2, 2, 3)) -> bytes:
    header = wire.Header(job, "4", unit, token, "float32", shape)
    return b"".join(bytes(p) for p in wire.encode(header, np.zeros(shape, np.float32)))


@pytest.mark.parametrize("body, status, words", [
    (b"", 400, "truncated"),
    (b"GARBAGE!", 400, "magic"),
    (wire.MAGIC + (5).to_bytes(4, "big") + b"{bad}", 400, "not JSON"),
    (_frame(), 404, "no job"),
])
def test_bad_result_frames_are_refused(live, body, status, words):
    resp = requests.post(live.master.url + "/distributed/result", data=body, timeout=10)
    assert resp.status_code == status, resp.text
    assert words in resp.json()["error"]


def test_results_cannot_be_injected_into_a_running_job(live):
    prompt_id = live.master.queue_prompt(image_workflow(seed=1, batch=1, seconds_per_image=2.0))
    import harness
    job = harness.wait_until(lambda: live.master.get("/distributed/status").json()["jobs"], 20,
                             what="the job to show")[0]
    resp = requests.post(live.master.url + "/distributed/result",
                         data=_frame(job=job["job_id"], unit=1, shape=(1, 8, 8, 3)), timeout=10)
    assert resp.status_code == 403
    frame = _frame(job=job["job_id"], unit=1, shape=(1, 8, 8, 3))
    resp = requests.post(live.master.url + "/distributed/result", data=frame[:-10], timeout=10,
                         headers={"Content-Length": str(len(frame) - 10)})
    assert resp.status_code in (400, 403)
    entry = live.master.wait_prompt(prompt_id, 60)
    assert error_of(entry) == ""
    assert len(live.master.saved_images(entry, "5")) == 3
    # the job has ended: a late result is answered 410 Gone
    resp = requests.post(live.master.url + "/distributed/result", data=_frame(job=job["job_id"]), timeout=10)
    assert resp.status_code == 410


def _missing_input(prompt):
    del prompt["2"]["inputs"]["width"]  # a required input: ComfyUI's validation refuses with 400


def _unknown_node(prompt):
    prompt["9"] = {"class_type": "NoSuchNode", "inputs": {}}  # some ComfyUI versions answer 500 here


@pytest.mark.parametrize("spoil", [_missing_input, _unknown_node])
def test_rejected_prompt_leaves_nothing_on_the_workers(live, spoil):
    prompt = image_workflow(seed=1, batch=1)
    spoil(prompt)
    before = [len(w.get("/history").json()) for w in live.workers]
    resp = live.master.post("/prompt", {"prompt": prompt})
    assert resp.status_code in (400, 500)
    import time
    time.sleep(1.5)
    assert [len(w.get("/history").json()) for w in live.workers] == before
    assert all(w.idle() for w in live.workers)
    assert live.master.get("/distributed/status").json()["jobs"] == []


def test_interrupt_reaches_every_instance(live):
    resp = live.master.post("/distributed/interrupt")
    assert resp.status_code == 200
    assert {r["id"] for r in resp.json()["results"] if r["ok"]} == {"master", "worker1", "worker2"}


@pytest.mark.parametrize("headers", [
    {},                                                   # a script without the secret
    {"X-Distributed-Secret": "guess"},                    # a wrong secret
    {"Origin": "http://evil.example"},                    # another web site, from a browser
    {"Origin": "null"},
])
def test_state_changing_routes_refuse_strangers(live, headers):
    before = live.config_path.read_text()
    for method, path in [("POST", "/distributed/config"), ("POST", "/distributed/clear_vram"),
                         ("POST", "/distributed/interrupt"), ("POST", "/distributed/workers"),
                         ("DELETE", "/distributed/workers/worker1"), ("POST", "/distributed/workers/worker1/start"),
                         ("POST", "/api/distributed/config")]:
        resp = requests.request(method, live.master.url + path, json={}, headers=headers, timeout=10)
        assert resp.status_code == 403, (method, path, resp.status_code)
        if resp.headers.get("Content-Type", "").startswith("application/json"):
            assert "X-Distributed-Secret" in resp.json()["error"]
        # else: newer ComfyUI refuses cross-site requests itself, before our routes see them
    assert live.config_path.read_text() == before


def test_the_page_itself_and_secret_holders_are_let_in(live):
    config = live.master.get("/distributed/config").json()["config"]
    same_origin = {"Origin": live.master.url}
    assert requests.post(live.master.url + "/distributed/config", json=config, headers=same_origin,
                         timeout=10).status_code == 200
    assert live.master.post("/distributed/config", config).status_code == 200  # sends the secret
    shown = requests.get(live.master.url + "/distributed/secret", headers={"Sec-Fetch-Site": "same-origin"},
                         timeout=10).json()
    assert {"X-Distributed-Secret": shown["secret"]} == live.master.auth()
    assert requests.get(live.master.url + "/distributed/secret", timeout=10).status_code == 403
