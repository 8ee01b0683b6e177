"""Managing workers through the master's HTTP API (what the panel uses), on a real ComfyUI."""
from __future__ import annotations

import json

import pytest
import requests

from harness import free_port, wait_until

pytestmark = pytest.mark.timeout(300)


def test_add_edit_remove_a_worker(live):
    port = free_port()
    resp = live.master.post("/distributed/workers", {"name": "box", "host": "10.0.0.7", "port": port,
                                                      "device": 3, "extra_args": "--lowvram"})
    assert resp.status_code == 200, resp.text
    worker = resp.json()["worker"]
    assert worker["id"] == "worker3" and worker["host"] == "10.0.0.7"
    on_disk = json.loads(live.config_path.read_text())
    assert on_disk["workers"][-1]["name"] == "box"

    resp = live.master.request("PATCH", f"/distributed/workers/{worker['id']}", {"enabled": False})
    assert resp.status_code == 200 and resp.json()["worker"]["enabled"] is False
    assert json.loads(live.config_path.read_text())["workers"][-1]["enabled"] is False

    assert live.master.request("DELETE", f"/distributed/workers/{worker['id']}").status_code == 200
    assert [w["id"] for w in json.loads(live.config_path.read_text())["workers"]] == ["worker1", "worker2"]
    assert live.master.request("DELETE", "/distributed/workers/nobody").status_code == 404


@pytest.mark.parametrize("body, words", [
    ({"name": "x", "port": 70000}, "port: must be a whole number from 1 to 65535"),
    ({"port": 9999, "extra_args": "--cpu; reboot"}, "extra_args: shell characters"),
    ({"port": 9999, "colour": "red"}, "unknown field"),
    ({"port": 9999, "host": "bad host!"}, "host: must be a host name"),
])
def test_bad_worker_is_refused_and_nothing_saved(live, body, words):
    before = live.config_path.read_text()
    resp = live.master.post("/distributed/workers", body)
    assert resp.status_code == 400
    assert words in resp.json()["error"]
    assert live.config_path.read_text() == before


def test_port_taken_by_another_worker_is_refused(live):
    resp = live.master.request("PATCH", "/distributed/workers/worker2", {"port": live.workers[0].port})
    assert resp.status_code == 400 and "already used" in resp.json()["error"]


def test_detect_gpus_answers_a_list(live):
    resp = live.master.get("/distributed/gpus", timeout=30)
    assert resp.status_code == 200 and isinstance(resp.json()["gpus"], list)


def test_start_view_log_and_stop_a_local_worker(live):
    port = free_port()
    worker = live.master.post("/distributed/workers", {"name": "extra", "port": port}).json()["worker"]
    resp = live.master.post(f"/distributed/workers/{worker['id']}/start")
    assert resp.status_code == 200, resp.text
    url = f"http://127.0.0.1:{port}/system_stats"

    def answers():
        try:
            return requests.get(url, timeout=2).ok
        except requests.RequestException:
            return False
    try:
        wait_until(answers, 240, what="the started worker to answer")
        def seen_online():  # the master's next check (every 2 s) sees it
            rows = {r["id"]: r for r in live.master.get("/distributed/status").json()["instances"]}
            return rows if rows[worker["id"]]["state"] == "online" else None
        status = wait_until(seen_online, 20, interval=0.3, what="the master to see the worker online")
        assert status[worker["id"]]["managed"] is True and status["worker1"]["managed"] is False
        log = live.master.get(f"/distributed/workers/{worker['id']}/log?lines=50").json()
        assert log["running"] is True and str(port) in log["log"]
        again = live.master.post(f"/distributed/workers/{worker['id']}/start")
        assert again.status_code == 409 and "already running" in again.json()["error"]
    finally:
        stopped = live.master.post(f"/distributed/workers/{worker['id']}/stop", timeout=60)
    assert stopped.status_code == 200
    wait_until(lambda: not answers(), 30, what="the worker to stop")
    assert live.master.post(f"/distributed/workers/{worker['id']}/stop").status_code == 409


def test_log_refuses_path_tricks(live):
    assert live.master.get("/distributed/workers/a.b/log").status_code == 400
    assert live.master.get("/distributed/workers/worker1/log?lines=abc").status_code == 400


def test_remote_worker_cannot_be_started_here(live):
    worker = live.master.post("/distributed/workers", {"host": "10.1.2.3", "port": 8190}).json()["worker"]
    resp = live.master.post(f"/distributed/workers/{worker['id']}/start")
    assert resp.status_code == 409 and "10.1.2.3" in resp.json()["error"]
