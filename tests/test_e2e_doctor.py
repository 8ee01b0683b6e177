"""The worker doctor against real ComfyUI servers: POST /distributed/check before any job, and the
pre-dispatch check that leaves out a worker lacking a model the prompt needs."""
from __future__ import annotations

import json
import os
import time

import pytest

from harness import Instance, blue_values, error_of, free_port, image_workflow, wait_until, write_config

pytestmark = pytest.mark.timeout(400)

CHECKPOINT = "only-on-master.safetensors"


def by_id(answer: dict) -> dict:
    return {i["id"]: i for i in answer["instances"]}


def test_check_reports_a_running_worker_and_one_that_is_not_running(live):
    config = live.default_config()
    config["workers"].append({"id": "ghost", "name": "ghost", "port": free_port(), "enabled": True})
    config["workers"].append({"id": "off", "name": "off", "port": free_port(), "enabled": False})
    live.reset_config(config)
    started = time.monotonic()
    resp = live.master.post("/distributed/check", {})
    print(f"\n[doctor] check of 4 instances, one not running: {time.monotonic() - started:.2f} s")
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    found = by_id(answer)
    assert set(found) == {"master", "worker1", "worker2", "ghost"}  # enabled workers only
    version = answer["extension_version"]
    assert version not in ("", "unknown")
    for worker_id in ("worker1", "worker2"):
        w = found[worker_id]
        assert w["reachable"] is True and w["relay"] is True, w  # a websocket got through to its extension
        assert w["extension_version"] == version and w["missing"] == [] and w["message"] == "Ready."
        assert w["comfyui_version"]  # "unknown" on ComfyUI before late 2024, else its version
    ghost = found["ghost"]
    assert ghost["reachable"] is False and ghost["relay"] is None
    assert "cannot connect" in ghost["message"] and "start it" in ghost["message"], ghost
    assert "nothing listens on that port" in ghost["message"] and "Errno" not in ghost["message"], ghost
    assert found["master"]["reachable"] is True and found["master"]["message"].startswith("Ready")


def test_check_needs_the_secret_and_a_well_formed_body(live):
    import requests
    resp = requests.post(live.master.url + "/distributed/check", json={}, timeout=10)
    assert resp.status_code == 403 and resp.json()["need"] == "secret"
    for body in ([1], {"prompt": [1]}, {"prompt": {"1": 5}}):
        resp = live.master.post("/distributed/check", body)
        assert resp.status_code == 400 and "prompt" in resp.json()["error"], body
    # a worker's relay needs a prompt's credential (or asks for the doctor's probe)
    resp = requests.get(live.workers[0].url + "/distributed/relay", timeout=10)
    assert resp.status_code == 403 and "credential" in resp.json()["error"]


def test_check_names_a_node_class_a_worker_lacks_and_a_missing_input(live):
    prompt = image_workflow(seed=3, batch=1)
    prompt["2b"] = {"class_type": "NoSuchNodeAnywhere", "inputs": {}}
    prompt["6"] = {"class_type": "LoadImage", "inputs": {"image": "nowhere.png"}}
    found = by_id(live.master.post("/distributed/check", {"prompt": prompt}).json())
    # not upstream of the Collector: a worker is not sent it, the master still is
    assert [m["name"] for m in found["worker1"]["missing"]] == ["nowhere.png"]
    names = {(m["kind"], m["name"]) for m in found["master"]["missing"]}
    assert ("node", "NoSuchNodeAnywhere") in names and ("input", "nowhere.png") in names


@pytest.fixture
def master_with_model(live, tmp_path):
    """A master whose models include a checkpoint that the session's workers lack (through
    --extra-model-paths-config), and a second worker that has it too."""
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    (models / "checkpoints" / CHECKPOINT).write_bytes(os.urandom(4096))  # listed, never loaded
    paths = tmp_path / "extra_model_paths.yaml"
    paths.write_text(f"only_here:\n    base_path: {models}\n    checkpoints: checkpoints\n")
    env = {**live.env, "COMFYUI_DISTRIBUTED_CONFIG": str(tmp_path / "gpu_config.json")}
    args = ["--extra-model-paths-config", str(paths)]
    master = Instance(live.tree, "master_models", free_port(), tmp_path, env, extra_args=args)
    has_it = Instance(live.tree, "worker_models", free_port(), tmp_path, env, extra_args=args)
    write_config(tmp_path / "gpu_config.json", {
        "master": {"port": master.port, "enabled": True},
        "workers": [{"id": "lacks", "name": "lacks-model", "port": live.workers[0].port},
                    {"id": "has", "name": "has-model", "port": has_it.port}],
        "settings": {"job_timeout": 20}})
    try:
        for instance in (master, has_it):
            instance.start()
        for instance in (master, has_it):
            instance.wait_ready()
        yield master
    finally:
        for instance in (master, has_it):
            instance.stop()


def needs_checkpoint(seed: int, seconds: float = 0.0) -> dict:
    prompt = image_workflow(seed=seed, batch=1, seconds_per_image=seconds)
    prompt["3b"] = {"class_type": "DistributedTestNeedsCheckpoint", "inputs": {"images": ["3", 0],
                                                                             "ckpt_name": CHECKPOINT}}
    prompt["4"]["inputs"]["images"] = ["3b", 0]
    return prompt


def test_a_checkpoint_on_the_master_only_is_named_and_the_worker_left_out(master_with_model):
    master = master_with_model
    loader = {"9": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
              "10": {"class_type": "MultiGPUCollector", "inputs": {"images": ["11", 0]}},
              "11": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}}
    found = by_id(master.post("/distributed/check", {"prompt": loader}).json())
    # the loader is not upstream of the Collector here: checked on the master only
    assert found["lacks"]["missing"] == [] and found["master"]["missing"] == []

    found = by_id(master.post("/distributed/check", {"prompt": needs_checkpoint(7)}).json())
    lacking = found["lacks"]["missing"]
    assert [(m["kind"], m["name"], m["input"]) for m in lacking] == [("model", CHECKPOINT, "ckpt_name")]
    assert CHECKPOINT in found["lacks"]["message"] and "copy the model files" in found["lacks"]["message"]
    assert found["has"]["missing"] == [] and found["master"]["missing"] == []

    # a job leaves that worker out, says why, and still delivers every image in order
    prompt_id = master.queue_prompt(needs_checkpoint(50, seconds=1.0))
    notices = wait_until(lambda: [n for j in master.get("/distributed/status").json()["jobs"]
                                  for n in j.get("notices", [])], 60, what="a notice")
    entry = master.wait_prompt(prompt_id, 120)
    assert error_of(entry) == ""
    assert blue_values(master.saved_images(entry, "5")) == [50, 51, 52]  # slot 1 rendered by has-model
    assert any("lacks-model" in n and CHECKPOINT in n and "lacks what this workflow needs" in n
               for n in notices), notices
    assert f"lacks-model failed: it lacks what this workflow needs: models/checkpoints/{CHECKPOINT}" \
        in master.log_tail(400)


def test_a_worker_that_does_not_answer_is_reported_in_seconds(live):
    import signal
    live.workers[1].signal(signal.SIGSTOP)  # accepts connections, answers nothing
    try:
        started = time.monotonic()
        resp = live.master.post("/distributed/check", {"prompt": image_workflow(seed=1, batch=1)}, timeout=30)
        print(f"\n[doctor] check with a frozen worker: {time.monotonic() - started:.2f} s")
    finally:
        live.workers[1].signal(signal.SIGCONT)
    found = by_id(resp.json())
    assert found["worker2"]["reachable"] is False and "did not answer in time" in found["worker2"]["message"]
    assert found["worker1"]["reachable"] is True and found["worker1"]["relay"] is True


def test_status_answer_has_the_checked_shape(live):
    answer = live.master.post("/distributed/check", {}).json()
    keys = {"id", "name", "reachable", "relay", "comfyui_version", "extension_version", "missing", "message"}
    assert all(keys <= set(i) for i in answer["instances"]), json.dumps(answer)[:500]
