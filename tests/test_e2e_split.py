"""Split mode end to end on real ComfyUI: one logical batch shared out by global batch index."""
from __future__ import annotations

import json
import time

import pytest

from distributed_core import plan, workflow
from harness import batch_indices, error_of, split_workflow, wait_until

pytestmark = pytest.mark.timeout(300)


def run(cluster, prompt, timeout=180):
    entry = cluster.master.wait_prompt(cluster.master.queue_prompt(prompt), timeout)
    assert error_of(entry) == "", error_of(entry)
    return cluster.master.saved_images(entry, "5")


def images_by_port(cluster) -> dict[int, int]:
    counts: dict[int, int] = {}
    for probe in cluster.probes():
        if probe["label"] == "split":
            counts[probe["port"]] = counts.get(probe["port"], 0) + probe["batch"]
    return counts


def test_split_batch_comes_back_in_global_order(live):
    images = run(live, split_workflow(batch=10))
    assert batch_indices(images) == list(range(10))
    counts = images_by_port(live)
    assert sum(counts.values()) == 10 and len(counts) == 3, counts  # everyone took part, nobody twice


def test_split_without_workers_is_the_whole_batch_on_the_master(live):
    config = live.default_config()
    for worker in config["workers"]:
        worker["enabled"] = False
    live.reset_config(config)
    assert batch_indices(run(live, split_workflow(batch=5))) == list(range(5))


def test_slow_worker_receives_fewer_images(live):
    config = live.default_config()
    config["master"]["enabled"] = False
    live.reset_config(config)
    live.set_speeds({"worker1": 1.0, "worker2": 4.0})
    # A cost of its own gives this workflow a signature of its own: speeds are learned per
    # signature, and the master keeps in memory what earlier tests of the session taught it.
    cost = 0.3 + (time.time_ns() % 997) * 1e-6
    first = split_workflow(batch=6, seconds_per_image=cost)
    sig = plan.signature(first, workflow.upstream(first, workflow.layout(first, ["4"]).fanned))
    run(live, first)  # the master learns the speeds
    learned = live.workdir / "throughput.json"  # each worker's speed is read from its prompt's history,
    slow_name, fast_name = live.workers[0].name, live.workers[1].name  # a moment after the job has ended

    def learned_apart():
        rates = json.loads(learned.read_text()).get(sig, {}) if learned.exists() else {}
        return slow_name in rates and fast_name in rates and rates[slow_name] < 0.8 * rates[fast_name]
    try:
        wait_until(learned_apart, 30, what="both workers' speeds to be learned")
    except TimeoutError:
        raise AssertionError(f"signature {sig}: {learned.read_text() if learned.exists() else 'no file'}") from None
    live.probe_log.unlink()
    images = run(live, split_workflow(batch=20, seconds_per_image=cost))
    assert batch_indices(images) == list(range(20))
    counts = images_by_port(live)
    slow, fast = counts.get(live.workers[0].port, 0), counts.get(live.workers[1].port, 0)
    assert slow + fast == 20 and slow < fast, counts


def test_unreachable_worker_in_split_mode(live):
    from harness import free_port
    config = live.default_config()
    config["workers"].insert(0, {"id": "ghost", "port": free_port(), "enabled": True})
    live.reset_config(config)
    assert batch_indices(run(live, split_workflow(batch=12))) == list(range(12))


def test_linked_batch_size_is_a_clear_error(live):
    prompt = split_workflow(batch=4)
    prompt["6"] = {"class_type": "DistributedSeed", "inputs": {"seed": 4}}
    prompt["1"]["inputs"]["batch_size"] = ["6", 0]
    # refused when queued, before any node renders (it used to fail in the Collector, after the
    # master had rendered its share)
    resp = live.master.post("/prompt", {"prompt": prompt, "client_id": "tests"})
    assert resp.status_code == 400, resp.text
    assert "must be a number in the node" in resp.json()["error"]["message"]
    assert not live.probes(), "a node rendered although the prompt was refused"
    assert live.master.idle() and all(w.idle() for w in live.workers)
