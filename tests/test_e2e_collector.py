"""The Multi-GPU Collector end to end: a real master and two real workers on loopback."""
from __future__ import annotations

import signal

import pytest

from harness import blue_values, error_of, image_workflow, wait_until

pytestmark = pytest.mark.timeout(300)


def run(cluster, prompt, timeout=120):
    prompt_id = cluster.master.queue_prompt(prompt)
    entry = cluster.master.wait_prompt(prompt_id, timeout)
    return prompt_id, entry


def test_every_participant_renders_in_order(live):
    _pid, entry = run(live, image_workflow(seed=100, batch=2))
    assert error_of(entry) == ""
    images = live.master.saved_images(entry, "5")
    # master (seed+0) first, then worker1 (slot 1), then worker2 (slot 2); each keeps its batch of 2
    assert blue_values(images) == [100, 100, 101, 101, 102, 102]
    ports = sorted(p["port"] for p in live.probes())
    assert ports == sorted([live.master.port, live.workers[0].port, live.workers[1].port])


def test_workers_run_only_the_upstream_part(live):
    before = {worker.name: set(worker.get("/history").json()) for worker in live.workers}
    pngs_before = {worker.name: set(worker.dirs["output"].rglob("*.png")) for worker in live.workers}
    _pid, entry = run(live, image_workflow(seed=7, batch=1))
    assert error_of(entry) == ""
    for worker in live.workers:
        # this job's prompts only: earlier tests of the session (spread prompts, say) ran there too
        history = {k: v for k, v in worker.get("/history").json().items() if k not in before[worker.name]}
        assert history, f"{worker.name} ran nothing"
        for item in history.values():
            classes = {n["class_type"] for n in item["prompt"][2].values()}
            assert "SaveImage" not in classes
            assert "MultiGPUCollector" in classes
        # (earlier tests of the session may have queued a plain prompt of their own there)
        assert set(worker.dirs["output"].rglob("*.png")) == pngs_before[worker.name], "a worker saved images"


def test_same_seed_same_images_and_api_client(live):
    # a plain HTTP client (no browser) gets distribution too, and reruns are reproducible
    first = blue_values(live.master.saved_images(run(live, image_workflow(seed=5, batch=1))[1], "5"))
    second = blue_values(live.master.saved_images(run(live, image_workflow(seed=5, batch=1))[1], "5"))
    assert first == second == [5, 6, 7]


def test_disabled_worker_is_left_out(live):
    config = live.default_config()
    config["workers"][0]["enabled"] = False
    live.reset_config(config)
    _pid, entry = run(live, image_workflow(seed=50, batch=1))
    # worker2 keeps its slot-2 seed offset although worker1 is off
    assert blue_values(live.master.saved_images(entry, "5")) == [50, 52]
    assert live.workers[0].port not in {p["port"] for p in live.probes()}


def test_unreachable_worker_share_is_rendered_elsewhere(live):
    from harness import free_port
    config = live.default_config()
    config["workers"].insert(1, {"id": "ghost", "name": "ghost", "port": free_port(), "device": 3,
                                 "enabled": True, "extra_args": ""})
    live.reset_config(config)
    _pid, entry = run(live, image_workflow(seed=10, batch=1))
    assert error_of(entry) == ""
    # the ghost's slot (2) is rendered by someone else with the ghost's seed: the count and order hold
    assert blue_values(live.master.saved_images(entry, "5")) == [10, 11, 12, 13]


def test_staggered_mode_spaces_the_workers(live):
    live.reset_config(live.default_config(mode="staggered", stagger_delay=1.5))
    _pid, entry = run(live, image_workflow(seed=1, batch=1))
    assert error_of(entry) == ""
    starts = {p["port"]: p["started"] for p in live.probes()}
    gap = starts[live.workers[1].port] - starts[live.workers[0].port]
    assert gap >= 1.2, f"workers started only {gap:.2f} s apart"


def test_parallel_mode_starts_workers_together(live):
    _pid, entry = run(live, image_workflow(seed=1, batch=1, seconds_per_image=1.0))
    assert error_of(entry) == ""
    starts = {p["port"]: p["started"] for p in live.probes()}
    # both workers were working at once: each started before the other ended
    probes = {p["port"]: p for p in live.probes()}
    w1, w2 = probes[live.workers[0].port], probes[live.workers[1].port]
    assert w1["started"] < w2["ended"] and w2["started"] < w1["ended"], starts


def test_clear_vram_reaches_every_instance(live):
    resp = live.master.post("/distributed/clear_vram")
    assert resp.status_code == 200
    results = {r["id"]: r for r in resp.json()["results"]}
    assert set(results) == {"master", "worker1", "worker2"}
    assert all(r["ok"] for r in results.values()), results


def test_clear_vram_names_an_unreachable_worker(live):
    from harness import free_port
    config = live.default_config()
    config["workers"].append({"id": "ghost", "port": free_port(), "enabled": True})
    live.reset_config(config)
    results = {r["id"]: r for r in live.master.post("/distributed/clear_vram").json()["results"]}
    assert results["ghost"]["ok"] is False and "cannot connect" in results["ghost"]["error"]
    assert results["worker1"]["ok"] and results["master"]["ok"]


def test_status_reports_every_instance(live):
    # what the master's checks last saw, at most a couple of seconds old: the queues just emptied
    def seen_idle():
        body = live.master.get("/distributed/status").json()
        return body if all(r["queue"] == 0 for r in body["instances"]) else None
    body = wait_until(seen_idle, 20, what="the master's checks to see every queue empty")
    rows = {r["id"]: r for r in body["instances"]}
    assert list(rows) == ["master", "worker1", "worker2"]
    for row in rows.values():
        assert row["state"] == "online"
        assert row["queue"] == 0
        assert row["device_name"]
        assert row["url"].startswith("http://127.0.0.1:")
        assert {"name", "role", "enabled", "vram_total", "vram_free"} <= set(row)


def test_timeout_names_the_frozen_worker(live):
    config = live.default_config(job_timeout=3)
    config["workers"] = config["workers"][:1]
    live.reset_config(config)
    worker = live.workers[0]
    prompt_id = live.master.queue_prompt(image_workflow(seed=3, batch=1, seconds_per_image=2.0))
    wait_until(lambda: any(p["port"] == live.master.port for p in live.probes()) or
               not worker.idle(), 20, what="the worker to get its prompt")
    worker.signal(signal.SIGSTOP)
    try:
        entry = live.master.wait_prompt(prompt_id, 60)
    finally:
        worker.signal(signal.SIGCONT)
    message = error_of(entry)
    assert "worker1" in message and "no sign of progress" in message, message


def test_two_jobs_back_to_back(live):
    ids = [live.master.queue_prompt(image_workflow(seed=s, batch=1, seconds_per_image=0.3)) for s in (20, 40)]
    entries = [live.master.wait_prompt(i, 120) for i in ids]
    assert [blue_values(live.master.saved_images(e, "5")) for e in entries] == [[20, 21, 22], [40, 41, 42]]
    # nothing is held once both jobs are done
    assert live.master.get("/distributed/status").json()["jobs"] == []


def test_everything_disabled_is_a_clear_error(live):
    config = live.default_config()
    config["master"]["enabled"] = False
    for w in config["workers"]:
        w["enabled"] = False
    live.reset_config(config)
    resp = live.master.post("/prompt", {"prompt": image_workflow(seed=1, batch=1), "client_id": "tests"})
    assert resp.status_code == 400 and "Nothing to render on" in resp.json()["error"]["message"], resp.text


def test_master_disabled_only_gathers(live):
    config = live.default_config()
    config["master"]["enabled"] = False
    live.reset_config(config)
    _pid, entry = run(live, image_workflow(seed=30, batch=2))
    assert blue_values(live.master.saved_images(entry, "5")) == [31, 31, 32, 32]
    assert live.master.port not in {p["port"] for p in live.probes()}


def test_bundled_example_runs_and_says_where_images_are(live, capsys):
    from distributed_core import example
    assert example.run(live.master.url, live.master.dirs["output"], timeout=120) == 0
    out = capsys.readouterr().out
    saved = [line.strip() for line in out.splitlines() if line.strip().endswith(".png")]
    assert len(saved) == 6  # batch 2 on each of three participants
    assert all(__import__("os").path.exists(path) for path in saved)
    # each participant's images have its own, clearly different colour: master, worker1, worker2
    from PIL import Image
    from distributed_core import plan
    seed, step = example.PROMPT["1"]["inputs"]["seed"], example.PROMPT["1"]["inputs"]["step"]
    expected = [[(plan.seed_for(seed, k * step) >> s) & 0xFF for s in (16, 8, 0)] for k in (0, 0, 1, 1, 2, 2)]
    assert [list(Image.open(path).convert("RGB").getpixel((5, 5))) for path in saved] == expected


@pytest.mark.parametrize("transport", ["float32", "uint8", "png"])
def test_every_transport_delivers_the_same_images(live, transport):
    live.reset_config(live.default_config(transport=transport))
    _pid, entry = run(live, image_workflow(seed=60, batch=2, size=24))
    assert blue_values(live.master.saved_images(entry, "5")) == [60, 60, 61, 61, 62, 62]


def _assert_inverted(values: list[int], seeds: list[int]) -> None:
    """ImageInvert's blue values are 255 - seed, or one less: SaveImage truncates 1 - x."""
    assert len(values) == len(seeds) and all(255 - s - v in (0, 1) for v, s in zip(values, seeds)), values


def _chained(seed: int) -> dict:
    """Two Collectors in a row: the second one receives an already gathered batch."""
    prompt = image_workflow(seed=seed, batch=2)
    prompt["5"] = {"class_type": "ImageInvert", "inputs": {"image": ["4", 0]}}
    prompt["6"] = {"class_type": "MultiGPUCollector", "inputs": {"images": ["5", 0]}}
    prompt["7"] = {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "chained"}}
    return prompt


def test_two_collectors_in_a_row_gather_each_image_once(live):
    for worker in live.workers:
        worker.post("/history", {"clear": True})
    _pid, entry = run(live, _chained(100))
    assert error_of(entry) == ""
    # each participant's two images once, inverted once (blue 255 - seed)
    _assert_inverted(blue_values(live.master.saved_images(entry, "7")), [100, 100, 101, 101, 102, 102])
    for worker in live.workers:
        for item in worker.get("/history").json().values():
            collectors = [n for n, node in item["prompt"][2].items() if node["class_type"] == "MultiGPUCollector"]
            assert collectors == ["4"], collectors


def test_parallel_collectors_each_gather_their_branch(live):
    prompt = image_workflow(seed=10, batch=1)
    prompt["6"] = {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}}
    prompt["7"] = {"class_type": "MultiGPUCollector", "inputs": {"images": ["6", 0]}}
    prompt["8"] = {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "branch"}}
    _pid, entry = run(live, prompt)
    assert error_of(entry) == ""
    assert blue_values(live.master.saved_images(entry, "5")) == [10, 11, 12]
    _assert_inverted(blue_values(live.master.saved_images(entry, "8")), [10, 11, 12])


def test_a_master_without_a_share_previews_nothing(live):
    config = live.default_config()
    config["master"]["enabled"] = False
    live.reset_config(config)
    prompt = image_workflow(seed=30, batch=1)
    prompt["9"] = {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "beside"}}
    _pid, entry = run(live, prompt)
    assert error_of(entry) == ""
    assert blue_values(live.master.saved_images(entry, "5")) == [31, 32]
    assert "9" not in entry["outputs"], "the master rendered a share nobody gave it"
    assert not list(live.master.dirs["output"].glob("beside*.png"))


def test_a_split_master_without_a_share_previews_nothing(live):
    from harness import batch_indices, split_workflow
    config = live.default_config()
    config["master"]["enabled"] = False
    live.reset_config(config)
    prompt = split_workflow(batch=4)
    prompt["9"] = {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "beside"}}
    _pid, entry = run(live, prompt)
    assert error_of(entry) == ""
    assert batch_indices(live.master.saved_images(entry, "5")) == [0, 1, 2, 3]
    assert "9" not in entry["outputs"], "the master rendered the whole split batch besides"
