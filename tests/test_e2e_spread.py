"""The spread queue on real ComfyUI servers: a master and two CPU workers on loopback, prompts
without a Collector queued by an API client, each rendered whole by one participant and saved on
the master as if it had rendered them."""
from __future__ import annotations

import json
import signal

import numpy as np
from PIL import Image

from harness import error_of, image_workflow, wait_until


def plain_workflow(k: int, seconds: float = 0.6, size: int = 8) -> dict:
    """A prompt without a Collector whose image's colour says which prompt it is (k)."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": size, "height": size, "batch_size": 1,
                                                     "color": 1000 + k}},
        "2": {"class_type": "DistributedTestProbe", "inputs": {"images": ["1", 0], "seconds_per_image": seconds,
                                                               "label": f"spread{k}"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": f"spread{k}"}},
    }


def spread_on(cluster, **settings) -> None:
    cluster.reset_config(cluster.default_config(spread_queue=True, **settings))


def queue_all(master, prompts: list[dict]) -> list[str]:
    return [master.queue_prompt(p) for p in prompts]


def finished(master, ids: list[str], timeout: float = 120) -> list[dict]:
    return [master.wait_prompt(pid, timeout) for pid in ids]


def renderers(cluster) -> dict[str, str]:
    """label -> the instance whose probe rendered it."""
    names = {i.port: i.name for i in cluster.instances}
    return {p["label"]: names[p["port"]] for p in cluster.probes()}


def saved(master, entry: dict, node: str = "3") -> list[Image.Image]:
    return [Image.open(master.dirs["output"] / item.get("subfolder", "") / item["filename"])
            for item in entry["outputs"][node]["images"]]


def as_submitted(prompt: dict) -> dict:
    """ComfyUI before mid-2024 writes each IS_CHANGED result into the prompt it runs (and so into
    the PNGs of a local run too): compare without it."""
    return {nid: {k: v for k, v in node.items() if k != "is_changed"} for nid, node in prompt.items()}


def test_six_prompts_spread_over_master_and_workers(live):
    spread_on(live)
    prompts = [plain_workflow(k) for k in range(6)]
    ids = queue_all(live.master, prompts)
    entries = finished(live.master, ids)
    for k, entry in enumerate(entries):
        assert entry["status"]["status_str"] == "success", error_of(entry)
        [image] = saved(live.master, entry)
        assert np.asarray(image.convert("RGB"))[0, 0].tolist() == [0, (1000 + k) >> 8 & 0xFF, (1000 + k) & 0xFF]
        assert as_submitted(json.loads(image.info["prompt"])) == prompts[k]
        assert entry["prompt"][2] == prompts[k]
    who = renderers(live)
    assert sorted(who) == [f"spread{k}" for k in range(6)]
    assert {"worker1", "worker2"} & set(who.values()), who
    assert "master" in who.values(), who
    # the workers saved nothing: only the master writes files
    for worker in live.workers:
        assert not list(worker.dirs["output"].glob("spread*.png"))


def test_queue_items_of_six_fields_reach_comfyuis_prompt_worker_whole(live):
    """ComfyUI 0.38 queues six fields and its prompt worker reads item[5] (a five-field item stops
    it for good). Re-created here: every item gets a sixth field, and each item the master's
    execution thread is handed is checked to still hold it, spread prompts rendered by a worker
    included (the master runs those with receivers in place of what the worker rendered)."""
    flag, log = live.workdir / "queue6.json", live.workdir / "queue6.json.log"
    flag.write_text("{}")
    try:
        # the execution thread's first get began before the check was installed: use it up
        live.master.wait_prompt(live.master.queue_prompt(plain_workflow(90, seconds=0.0)))
        spread_on(live)
        prompts = [plain_workflow(k, seconds=0.8) for k in range(60, 66)]
        ids = queue_all(live.master, prompts)
        entries = finished(live.master, ids)
    finally:
        flag.unlink()
    for k, entry in zip(range(60, 66), entries):
        assert entry["status"]["status_str"] == "success", error_of(entry)
        [image] = saved(live.master, entry)
        assert np.asarray(image.convert("RGB"))[0, 0].tolist() == [0, (1000 + k) >> 8 & 0xFF, (1000 + k) & 0xFF]
    handed = {r["prompt_id"]: r for r in map(json.loads, log.read_text().splitlines())}
    assert set(ids) <= set(handed), "the check never saw some of the master's prompts"
    assert all(handed[pid]["fields"] == 6 and handed[pid]["sixth_kept"] for pid in ids), [handed[p] for p in ids]
    who = renderers(live)
    assert {"worker1", "worker2"} & {who[f"spread{k}"] for k in range(60, 66)}, who  # workers took part


def test_spread_off_renders_everything_on_the_master(live):
    ids = queue_all(live.master, [plain_workflow(k, seconds=0.1) for k in range(3)])
    for entry in finished(live.master, ids):
        assert entry["status"]["status_str"] == "success"
    assert set(renderers(live).values()) == {"master"}


def master_off(cluster, **settings) -> None:
    """Spread on with the master only gathering, so that the workers render the prompts."""
    data = cluster.default_config(spread_queue=True, **settings)
    data["master"]["enabled"] = False
    cluster.reset_config(data)


def claims(master) -> list[dict]:
    return master.get("/distributed/spread").json()["prompts"]


def rendered_by(master, pid: str) -> str:
    """Who rendered a finished spread prompt, from the panel's list of recent prompts."""
    recent = wait_until(lambda: [r for r in master.get("/distributed/spread").json()["recent"]
                                 if r["prompt_id"] == pid and r["state"] == "done"], 10, what="the prompt's record")
    return recent[0]["participant"]


def wait_rendering(master, count: int = 1, timeout: float = 30) -> list[dict]:
    """Until ``count`` prompts run on workers; returns their claims."""
    return wait_until(lambda: (lambda c: c if len(c) >= count else None)(
        [c for c in claims(master) if c["participant"] != "master" and c["state"] == "running"]),
        timeout, what=f"{count} prompt(s) running on workers")


def stamps(entry: dict) -> dict[str, int]:
    """The execution events' timestamps (ms) in a history entry; none before mid-2024's ComfyUI."""
    return {m[0]: m[1]["timestamp"] for m in entry["status"]["messages"]
            if isinstance(m[1], dict) and "timestamp" in m[1]}


def test_a_prompt_a_worker_rendered_is_timed_from_when_the_worker_got_it(live):
    """ComfyUI's Queue tab (and jobs API) time a prompt from its history's execution_start to its
    end: for a spread prompt that a worker renders, the master's own run takes hundredths of a
    second, so its start is stamped when the worker was handed it."""
    master_off(live)
    try:
        [pid] = queue_all(live.master, [plain_workflow(3, seconds=2.0)])
        [entry] = finished(live.master, [pid])
    finally:
        live.reset_config()
    assert error_of(entry) == "" and rendered_by(live.master, pid) != "master"
    found = stamps(entry)
    if not found:  # ComfyUI before mid-2024 stamps no event, and so shows no time at all
        assert "execution_start" in [m[0] for m in entry["status"]["messages"]]
        return
    assert found["execution_success"] - found["execution_start"] >= 2000, found  # the worker's 2 s render


def test_worker_killed_mid_prompt_renders_elsewhere(live):
    master_off(live)
    ids = queue_all(live.master, [plain_workflow(k, seconds=3.0) for k in range(2)])
    running = wait_rendering(live.master, 2)
    victim = next(c for c in running if c["participant"] == "worker1")
    live.workers[0].signal(signal.SIGKILL)
    entries = finished(live.master, ids, timeout=90)
    assert all(e["status"]["status_str"] == "success" for e in entries), [error_of(e) for e in entries]
    k = ids.index(victim["prompt_id"])
    who = [p for p in live.probes() if p["label"] == f"spread{k}"]
    assert [live.workers[1].port] == [p["port"] for p in who if p["port"] != live.workers[0].port]
    assert saved(live.master, entries[k])
    recent = live.master.get("/distributed/spread").json()["recent"]
    assert any(r["prompt_id"] == victim["prompt_id"] and r["state"] == "moved" for r in recent), recent


def test_last_worker_lost_renders_on_the_master(live):
    data = live.default_config(spread_queue=True)
    data["master"]["enabled"] = False
    data["workers"][0]["enabled"] = False
    live.reset_config(data)
    [pid] = queue_all(live.master, [plain_workflow(0, seconds=3.0)])
    wait_rendering(live.master, 1)
    live.workers[1].signal(signal.SIGKILL)
    entry = live.master.wait_prompt(pid, 90)
    assert entry["status"]["status_str"] == "success", error_of(entry)
    assert renderers(live)["spread0"] == "master"


def test_frozen_worker_prompt_moves_after_job_timeout(live):
    data = live.default_config(spread_queue=True, job_timeout=3)
    data["master"]["enabled"] = False
    live.reset_config(data)
    ids = queue_all(live.master, [plain_workflow(k, seconds=2.0) for k in range(2)])
    running = wait_rendering(live.master, 2)
    frozen = next(c for c in running if c["participant"] == "worker2")
    live.workers[1].signal(signal.SIGSTOP)
    try:
        entries = finished(live.master, ids, timeout=90)
    finally:
        live.workers[1].signal(signal.SIGCONT)
    assert all(e["status"]["status_str"] == "success" for e in entries), [error_of(e) for e in entries]
    k = ids.index(frozen["prompt_id"])
    names = {i.port: i.name for i in live.instances}
    # worker2 may still finish its copy once it thaws; the master's prompt came from worker1
    assert "worker1" in {names[p["port"]] for p in live.probes() if p["label"] == f"spread{k}"}


def test_deleting_a_prompt_on_the_master_withdraws_it_from_the_worker(live):
    master_off(live)
    [pid] = queue_all(live.master, [plain_workflow(0, seconds=30.0)])
    [claim] = wait_rendering(live.master, 1)
    worker = next(w for w in live.workers if w.name == claim["participant"])
    assert not worker.idle()
    assert live.master.post("/queue", {"delete": [pid]}).status_code == 200
    wait_until(worker.idle, 15, what="the worker to drop the withdrawn prompt")
    assert pid not in live.master.get(f"/history/{pid}").json()
    assert not claims(live.master)
    # the queue goes on as before
    [after] = queue_all(live.master, [plain_workflow(1, seconds=0.1)])
    assert live.master.wait_prompt(after)["status"]["status_str"] == "success"


def test_error_on_a_worker_fails_the_prompt_with_its_message(live):
    master_off(live)
    prompt = plain_workflow(0, seconds=0.1)
    prompt["2"] = {"class_type": "DistributedTestFail", "inputs": {"images": ["1", 0],
                                                                  "message": "the sampler ran out of ink"}}
    prompt["3"]["inputs"]["filename_prefix"] = "inkfail"
    [pid] = queue_all(live.master, [prompt])
    entry = live.master.wait_prompt(pid, 60)
    assert entry["status"]["status_str"] == "error"
    assert "the sampler ran out of ink" in error_of(entry)
    assert "worker" in error_of(entry)
    assert not list(live.master.dirs["output"].glob("inkfail*.png"))


def test_latent_audio_and_mask_values_arrive_exactly(live):
    """LATENT (SaveLatent, in both versions), AUDIO and MASK, rendered on a worker and saved on the
    master by a test output node that keeps them bit for bit; SaveAudio where this ComfyUI has it."""
    import torch

    master_off(live)
    has_save_audio = "SaveAudio" in live.master.get("/object_info").json()
    prompt = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 2}},
        "2": {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["1", 0], "upscale_method": "nearest-exact",
                                                          "scale_by": 1.5}},
        "3": {"class_type": "DistributedTestAudio", "inputs": {"seed": 7, "samples": 4800}},
        "4": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 0x123456}},
        "5": {"class_type": "ImageToMask", "inputs": {"image": ["4", 0], "channel": "green"}},
        "6": {"class_type": "DistributedTestSaveValue", "inputs": {"filename": "spread-values", "audio": ["3", 0],
                                                                   "latent": ["2", 0], "mask": ["5", 0]}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["2", 0], "filename_prefix": "latents/spread"}},
    }
    if has_save_audio:
        prompt["8"] = {"class_type": "SaveAudio", "inputs": {"audio": ["3", 0], "filename_prefix": "audio/spread"}}
    [pid] = queue_all(live.master, [prompt])
    entry = live.master.wait_prompt(pid, 60)
    assert entry["status"]["status_str"] == "success", error_of(entry)
    [item] = entry["outputs"]["6"]["values"]
    assert item["port"] == live.master.port  # the output node ran on the master
    got = torch.load(live.master.dirs["output"] / "spread-values.pt")
    generator = torch.Generator().manual_seed(7)
    assert torch.equal(got["audio"]["waveform"], torch.rand([1, 2, 4800], generator=generator) * 2 - 1)
    assert got["audio"]["sample_rate"] == 24000
    assert got["latent"]["samples"].shape == (2, 4, 9, 12)
    assert torch.allclose(got["mask"], torch.full([1, 16, 16], 0x34 / 255.0))
    [latent_file] = entry["outputs"]["7"]["latents"]
    assert (live.master.dirs["output"] / latent_file["subfolder"] / latent_file["filename"]).exists()
    if has_save_audio:
        [audio_file] = entry["outputs"]["8"]["audio"]
        assert (live.master.dirs["output"] / audio_file["subfolder"] / audio_file["filename"]).stat().st_size > 0
    assert rendered_by(live.master, pid).startswith("worker")


def test_spread_prompts_and_collector_jobs_share_the_gpus(live):
    spread_on(live)
    submitted = []
    for k in range(6):
        if k % 2:
            submitted.append(("collector", live.master.queue_prompt(
                image_workflow(seed=10 * k, batch=2, seconds_per_image=0.2, label=f"job{k}"))))
        else:
            submitted.append(("spread", live.master.queue_prompt(plain_workflow(k, seconds=0.5))))
    for kind, pid in submitted:
        entry = live.master.wait_prompt(pid, 120)
        assert entry["status"]["status_str"] == "success", error_of(entry)
        images = entry["outputs"][{"collector": "5", "spread": "3"}[kind]]["images"]
        assert len(images) == (6 if kind == "collector" else 1)  # a Collector job still uses every GPU
    who = renderers(live)
    for k in (1, 3, 5):
        assert {p["port"] for p in live.probes() if p["label"] == f"job{k}"} == {i.port for i in live.instances}
    assert set(who[f"spread{k}"] for k in (0, 2, 4)) <= {"master", "worker1", "worker2"}


def test_interrupting_a_prompt_on_the_master_withdraws_it_from_the_worker(live):
    master_off(live)
    [pid] = queue_all(live.master, [plain_workflow(0, seconds=30.0)])
    [claim] = wait_rendering(live.master, 1)
    worker = next(w for w in live.workers if w.name == claim["participant"])
    assert live.master.post("/interrupt", {"prompt_id": pid}).status_code == 200
    entry = live.master.wait_prompt(pid, 30)
    assert entry["status"]["status_str"] == "error"
    assert "execution_interrupted" in [event for event, _data in entry["status"]["messages"]]
    wait_until(worker.idle, 15, what="the worker to drop the interrupted prompt")
