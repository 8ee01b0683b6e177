"""Workers placed and restarted by Ray (distributed_core/ray_workers.py), on one real local Ray head
with two logical GPUs and CPU-only ComfyUI workers: a Collector job across both, a worker's ComfyUI
killed and restarted by Ray, scaling 2 to 1 to 2, and an address where no cluster is."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from harness import Instance, blue_values, error_of, free_port, image_workflow, wait_until, write_config

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head --num-gpus=2` with this Python's Ray (CUDA_VISIBLE_DEVICES unset: an empty
    one makes --num-gpus fail); its address."""
    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.exists():
        pytest.fail("the test environment lacks Ray (tests/requirements.txt names it): run tests/run.py")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    temp = Path("/tmp") / f"ray-cdist-{os.getpid()}"  # Ray's socket paths must stay short
    started = subprocess.run([str(ray_cli), "start", "--head", f"--port={port}", "--num-gpus=2", "--num-cpus=8",
                              "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                             env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(ray_cli), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_master(cluster, ray_head, tmp_path_factory):
    """A master whose config names the Ray cluster, and no worker of its own."""
    workdir = tmp_path_factory.mktemp("ray")
    env = {**cluster.env, "COMFYUI_DISTRIBUTED_CONFIG": str(workdir / "gpu_config.json"),
           "COMFYUI_DISTRIBUTED_SECRET_FILE": str(workdir / "secret.key")}
    master = Instance(cluster.tree, "ray-master", free_port(), workdir, env)
    config = {"master": {"port": master.port, "enabled": True}, "workers": [],
              "ray": {"address": ray_head, "workers": 2, "extra_args": "--cpu"}, "settings": {"job_timeout": 20}}
    write_config(workdir / "gpu_config.json", config)
    master.start().wait_ready()
    try:
        yield master, workdir, config
    finally:
        master.stop()  # its detached actors end with the head (ray stop)


def ray_rows(master) -> list[dict]:
    return [r for r in master.get("/distributed/status").json()["instances"] if r["id"].startswith("ray-")]


def online(master, count: int, timeout: float = 240) -> list[dict]:
    return wait_until(lambda: (lambda rows: rows if len(rows) == count and all(r["state"] == "online" for r in rows)
                               else None)(ray_rows(master)), timeout, interval=1.0,
                      what=f"{count} Ray workers online")


def test_a_collector_job_runs_on_two_ray_workers(ray_master):
    master, _workdir, _config = ray_master
    rows = online(master, 2)
    assert [r["id"] for r in rows] == ["ray-1", "ray-2"]
    view = master.get("/distributed/status").json()["ray"]
    assert view["wanted"] == 2 and view["error"] == "" and len({w["gpus"][0] for w in view["workers"]}) == 2
    entry = master.wait_prompt(master.queue_prompt(image_workflow(seed=60, batch=1)), 180)
    assert error_of(entry) == ""
    assert blue_values(master.saved_images(entry, "5")) == [60, 61, 62]  # the master, ray-1, ray-2


def test_a_ray_worker_killed_is_restarted_and_used_again(ray_master):
    master, _workdir, _config = ray_master
    online(master, 2)
    before = {w["id"]: w for w in master.get("/distributed/status").json()["ray"]["workers"]}
    os.kill(before["ray-1"]["pid"], signal.SIGKILL)  # its ComfyUI dies: the actor exits, Ray starts it again
    wait_until(lambda: any(w["id"] == "ray-1" and w["pid"] != before["ray-1"]["pid"]
                           for w in master.get("/distributed/status").json()["ray"]["workers"]),
               240, interval=1.0, what="Ray to restart ray-1")
    online(master, 2)
    entry = master.wait_prompt(master.queue_prompt(image_workflow(seed=70, batch=1)), 180)
    assert error_of(entry) == ""
    assert blue_values(master.saved_images(entry, "5")) == [70, 71, 72]


def test_scaling_two_to_one_to_two(ray_master):
    master, workdir, config = ray_master
    online(master, 2)
    write_config(workdir / "gpu_config.json", {**config, "ray": {**config["ray"], "workers": 1}})
    try:
        online(master, 1, timeout=120)
        entry = master.wait_prompt(master.queue_prompt(image_workflow(seed=80, batch=1)), 180)
        assert error_of(entry) == "" and blue_values(master.saved_images(entry, "5")) == [80, 81]
    finally:
        write_config(workdir / "gpu_config.json", config)
    online(master, 2)
    entry = master.wait_prompt(master.queue_prompt(image_workflow(seed=90, batch=1)), 180)
    assert error_of(entry) == "" and blue_values(master.saved_images(entry, "5")) == [90, 91, 92]


def test_an_address_without_a_cluster_is_named_and_the_master_goes_on(cluster, tmp_path):
    env = {**cluster.env, "COMFYUI_DISTRIBUTED_CONFIG": str(tmp_path / "gpu_config.json"),
           "COMFYUI_DISTRIBUTED_SECRET_FILE": str(tmp_path / "secret.key")}
    master = Instance(cluster.tree, "ray-nowhere", free_port(), tmp_path, env)
    nowhere = f"127.0.0.1:{free_port()}"
    write_config(tmp_path / "gpu_config.json", {
        "master": {"port": master.port, "enabled": True},
        "workers": [{"id": "w1", "name": "worker1", "port": cluster.workers[0].port}],
        "ray": {"address": nowhere, "workers": 2}, "settings": {"job_timeout": 20}})
    master.start().wait_ready()
    try:
        view = wait_until(lambda: (lambda v: v if v["error"] else None)(master.get("/distributed/status").json()["ray"]),
                          120, interval=1.0, what="the Ray error")
        assert f"cannot reach the Ray cluster at {nowhere}" in view["error"] and "ray.address" in view["error"], view
        wait_until(lambda: all(r["state"] == "online" for r in master.get("/distributed/status").json()["instances"]),
                   60, interval=0.5, what="the configured worker online")
        entry = master.wait_prompt(master.queue_prompt(image_workflow(seed=20, batch=1)), 120)
        assert error_of(entry) == "" and blue_values(master.saved_images(entry, "5")) == [20, 21]
    finally:
        master.stop()


@pytest.mark.browser
def test_the_panel_lists_the_ray_workers_and_sets_their_count(ray_master, tmp_path):
    import json

    from playwright import sync_api
    from ui_support import ComfyPage, launch
    master, workdir, config = ray_master
    online(master, 2)
    with sync_api.sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            comfy = ComfyPage(browser.new_page(viewport={"width": 1400, "height": 900}), master.url)
            panel = comfy.open_panel()
            for worker_id in ("ray-1", "ray-2"):
                card = comfy.card(worker_id)
                sync_api.expect(card).to_have_attribute("data-state", "online", timeout=60_000)
            state = panel.locator(".cdist-ray-state")
            sync_api.expect(state).to_have_text(re.compile(r": 2 of 2 up$"), timeout=30_000)
            count = panel.locator(".cdist-ray-workers")
            sync_api.expect(count).to_have_value("2")
            count.fill("1")
            count.dispatch_event("change")
            wait_until(lambda: json.loads((workdir / "gpu_config.json").read_text())["ray"]["workers"] == 1, 30,
                       what="the panel to save the Ray worker count")
            sync_api.expect(comfy.card("ray-2")).to_have_count(0, timeout=120_000)
            sync_api.expect(state).to_have_text(re.compile(r": 1 of 1 up$"), timeout=60_000)
            comfy.screenshot("ray-panel", tmp_path)
            assert comfy.own_errors() == []
        finally:
            browser.close()
            write_config(workdir / "gpu_config.json", config)
    online(master, 2)
