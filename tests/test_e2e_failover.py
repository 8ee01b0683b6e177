"""Collector jobs and the fleet against real servers: a first job with workers that are not running, failover
that follows the config as it is now, a cancel that leaves other clients' prompts alone, and many
queued jobs without a false failover."""
from __future__ import annotations

import signal

import pytest

from harness import blue_values, error_of, log_since, log_size, free_port, image_workflow, wait_until

pytestmark = pytest.mark.timeout(300)




def states(live) -> dict[str, str]:
    return {r["id"]: r["state"] for r in live.master.get("/distributed/status", timeout=30).json()["instances"]}


def recent_job(live, prompt_id: str) -> dict:
    return wait_until(lambda: next((j for j in live.master.get("/distributed/status").json()["recent"]
                                    if j["prompt_id"] == prompt_id), None), 20, what="the job among the recent ones")


@pytest.fixture
def settled(live):
    """Every worker answers the master's checks before the test, and is back after it."""
    wait_until(lambda: set(states(live).values()) <= {"online", "busy"}, 60, interval=0.5, what="every instance online")
    yield live
    for worker in live.workers:
        worker.signal(signal.SIGCONT)
        if worker.process.poll() is not None:
            worker.start().wait_ready()


def test_a_fresh_install_renders_its_first_job_on_whoever_is_there(settled):
    """The shipped config names two workers that nobody started. The job renders on the master
    alone, with every seed slot, and says which workers were left out and why."""
    live = settled
    config = live.default_config()
    config["workers"] = [{"id": "gpu1", "name": "gpu1", "port": free_port(), "enabled": True},
                         {"id": "gpu2", "name": "gpu2", "port": free_port(), "enabled": True}]
    live.reset_config(config)
    wait_until(lambda: states(live) == {"master": "online", "gpu1": "offline", "gpu2": "offline"}, 30,
               interval=0.3, what="the master's checks to find both workers down")
    start = log_size(live.master)
    prompt_id = live.master.queue_prompt(image_workflow(seed=10, batch=1))
    entry = live.master.wait_prompt(prompt_id, 60)
    assert error_of(entry) == ""
    assert blue_values(live.master.saved_images(entry, "5")) == [10, 11, 12]  # the workers' seed slots stay
    notices = recent_job(live, prompt_id)["notices"]
    assert any("gpu1" in n and "left out" in n and "cannot connect" in n for n in notices), notices
    assert any("gpu2" in n and "left out" in n for n in notices), notices
    logged = log_since(live.master, start)
    assert "gpu1" in logged and "left out" in logged


def test_a_worker_that_is_down_is_left_out_and_one_that_is_up_renders(settled):
    live = settled
    config = live.default_config()
    config["workers"].insert(1, {"id": "ghost", "name": "ghost", "port": free_port(), "enabled": True})
    live.reset_config(config)
    wait_until(lambda: states(live).get("ghost") == "offline", 30, interval=0.3, what="the ghost to be seen down")
    prompt_id = live.master.queue_prompt(image_workflow(seed=20, batch=1))
    entry = live.master.wait_prompt(prompt_id, 60)
    assert error_of(entry) == ""
    # slot 2 (the ghost's) is rendered by someone else, with its seed: count and order hold
    assert blue_values(live.master.saved_images(entry, "5")) == [20, 21, 22, 23]
    job = recent_job(live, prompt_id)
    assert not [s for s in job["shares"] if s["participant"] == "ghost"], "the ghost was sent a share"
    assert any("ghost" in n and "left out" in n for n in job["notices"]), job["notices"]


def test_failover_follows_the_config_as_it_is_now(settled):
    """worker2 dies mid-job after worker1 was removed from the config: worker1 must not get
    worker2's units, so the job fails and says nobody is left."""
    live = settled
    live.reset_config(live.default_config(job_timeout=20))
    w1, w2 = live.workers
    prompt_id = live.master.queue_prompt(image_workflow(seed=40, batch=1, seconds_per_image=4.0, label="current"))
    wait_until(lambda: not w2.idle() and not w1.idle(), 30, interval=0.1, what="both workers to get their shares")
    config = live.default_config(job_timeout=20)
    config["workers"] = [w for w in config["workers"] if w["id"] != w1.name]
    assert live.master.post("/distributed/config", config).status_code == 200
    w2.signal(signal.SIGKILL)
    w2.process.wait(30)
    entry = live.master.wait_prompt(prompt_id, 90)
    assert "No other worker is left" in error_of(entry), error_of(entry)
    wait_until(lambda: w1.idle(), 30, what="worker1 to finish")
    ran = [item for item in w1.get("/history").json().values()
           if "_distributed" in str(item["prompt"][2]) and "current" in str(item["prompt"][2])]
    assert len(ran) == 1, f"worker1 ran {len(ran)} prompts of the job: a removed worker got failover work"


def test_cancelling_a_job_leaves_another_clients_prompt_on_a_worker_alone(settled):
    """A client's own slow prompt runs on worker1 when a distributed job is cancelled: the job's
    prompt waiting behind it is deleted, and the client's prompt still completes."""
    live = settled
    w1 = live.workers[0]
    theirs = {  # no Collector: a plain prompt of another client
        "2": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 3}},
        "3": {"class_type": "DistributedTestProbe", "inputs": {"images": ["2", 0], "seconds_per_image": 6.0,
                                                               "label": "theirs"}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "theirs"}},
    }
    their_id = w1.queue_prompt(theirs)
    wait_until(lambda: w1.get("/queue").json()["queue_running"], 20, interval=0.1,
               what="the other client's prompt to run")
    ours = live.master.queue_prompt(image_workflow(seed=60, batch=1, seconds_per_image=0.5, label="ours"))
    wait_until(lambda: len(w1.get("/queue").json()["queue_pending"]) == 1, 20, interval=0.1,
               what="the job's prompt to wait on worker1")
    assert live.master.post("/interrupt").status_code == 200  # ComfyUI's own cancel, on the master
    entry = live.master.wait_prompt(ours, 60)
    assert error_of(entry) or "interrupted" in str(entry["status"]), entry["status"]
    wait_until(lambda: not w1.get("/queue").json()["queue_pending"], 20, what="the job's prompt to be withdrawn")
    finished = w1.wait_prompt(their_id, 60)
    assert finished["status"]["status_str"] == "success", finished["status"]
    assert not any(event == "execution_interrupted" for event, _d in finished["status"]["messages"])


def test_thirty_queued_jobs_all_complete_without_a_false_failover(settled):
    live = settled
    start = log_size(live.master)
    ids = [live.master.queue_prompt(image_workflow(seed=7 * k, batch=1, label="many")) for k in range(30)]
    entries = [live.master.wait_prompt(i, 240) for i in ids]
    assert [error_of(e) for e in entries] == [""] * 30
    assert [blue_values(live.master.saved_images(e, "5")) for e in entries] == \
        [[7 * k, 7 * k + 1, 7 * k + 2] for k in range(30)]
    logged = log_since(live.master, start)
    assert " failed: " not in logged and "go to" not in logged, "a healthy worker was failed over"
