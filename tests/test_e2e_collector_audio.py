"""The Multi-GPU Collector's audio input end to end: a real master and two real workers on loopback.

Every participant renders a seeded test waveform beside its images; the master saves the gathered
audio with a test output node that keeps it bit for bit, and the test compares it with the
waveforms joined in the images' order (master first, then worker1, worker2; units in order)."""
from __future__ import annotations

import json
import signal
import time

import pytest
import torch

from harness import batch_indices, blue_values, error_of, image_workflow, split_workflow, wait_until

pytestmark = pytest.mark.timeout(300)

SAMPLES = 480


def waveform(seed: int, samples: int = SAMPLES) -> torch.Tensor:
    """What DistributedTestAudio renders for a seed."""
    return torch.rand([1, 2, samples], generator=torch.Generator().manual_seed(seed)) * 2 - 1


def joined(seeds: list[int], samples: int = SAMPLES) -> torch.Tensor:
    return torch.cat([waveform(s, samples) for s in seeds], dim=2)


def with_audio(prompt: dict, name: str, collector: str = "4", seed=("1", 0), **inputs) -> dict:
    """Audio beside the images: seeded by the Distributed Seed (so each participant's differs),
    into the Collector's audio input, its audio output saved on the master as ``name``.pt."""
    prompt["20"] = {"class_type": "DistributedTestAudio", "inputs": {"seed": list(seed) if isinstance(seed, tuple)
                                                                     else seed, "samples": SAMPLES, **inputs}}
    prompt[collector]["inputs"]["audio"] = ["20", 0]
    prompt["21"] = {"class_type": "DistributedTestSaveValue", "inputs": {"filename": name, "audio": [collector, 1]}}
    return prompt


def run(live, prompt, timeout=120) -> dict:
    entry = live.master.wait_prompt(live.master.queue_prompt(prompt), timeout)
    assert error_of(entry) == "", error_of(entry)
    return entry


def saved_audio(live, name: str) -> dict:
    return torch.load(live.master.dirs["output"] / f"{name}.pt")["audio"]


def new_history(worker, before: set) -> list[dict]:
    return [v for k, v in worker.get("/history").json().items() if k not in before]


@pytest.mark.parametrize("transport", ["float32", "png"])
def test_audio_is_gathered_in_the_order_of_the_images(live, transport):
    live.reset_config(live.default_config(transport=transport))
    before = {w.name: set(w.get("/history").json()) for w in live.workers}
    prompt = with_audio(image_workflow(seed=40, batch=2), f"gathered-{transport}")
    has_save_audio = "SaveAudio" in live.master.get("/object_info").json()
    if has_save_audio:  # a real consumer of the gathered audio, where this ComfyUI has one
        prompt["22"] = {"class_type": "SaveAudio", "inputs": {"audio": ["4", 1], "filename_prefix": "audio/gathered"}}
    entry = run(live, prompt)
    assert blue_values(live.master.saved_images(entry, "5")) == [40, 40, 41, 41, 42, 42]
    got = saved_audio(live, f"gathered-{transport}")
    assert got["sample_rate"] == 24000
    assert got["waveform"].dtype == torch.float32 and torch.equal(got["waveform"], joined([40, 41, 42]))
    for worker in live.workers:  # the audio's upstream ran on each worker, nothing after the Collector did
        [item] = new_history(worker, before[worker.name])
        classes = {n["class_type"] for n in item["prompt"][2].values()}
        assert "DistributedTestAudio" in classes and "DistributedTestSaveValue" not in classes
        assert not list(worker.dirs["output"].glob("*.pt"))
    if has_save_audio:
        [audio_file] = entry["outputs"]["22"]["audio"]
        assert (live.master.dirs["output"] / audio_file["subfolder"] / audio_file["filename"]).stat().st_size > 0


def test_a_participant_with_several_units_sends_their_audio_in_unit_order(live):
    from harness import free_port
    config = live.default_config()
    config["workers"].insert(1, {"id": "ghost", "name": "ghost", "port": free_port(), "device": 3,
                                 "enabled": True, "extra_args": ""})
    live.reset_config(config)
    entry = run(live, with_audio(image_workflow(seed=60, batch=1), "several"))
    # the ghost's slot (2) is rendered by a worker beside its own, with the ghost's seed
    assert blue_values(live.master.saved_images(entry, "5")) == [60, 61, 62, 63]
    assert torch.equal(saved_audio(live, "several")["waveform"], joined([60, 61, 62, 63]))


def test_a_master_that_only_gathers_still_gathers_audio(live):
    config = live.default_config()
    config["master"]["enabled"] = False
    live.reset_config(config)
    entry = run(live, with_audio(image_workflow(seed=30, batch=1), "idle-master"))
    assert blue_values(live.master.saved_images(entry, "5")) == [31, 32]
    assert torch.equal(saved_audio(live, "idle-master")["waveform"], joined([31, 32]))


def test_without_workers_the_collector_passes_its_own_audio_on(live):
    config = live.default_config()
    for worker in config["workers"]:
        worker["enabled"] = False
    live.reset_config(config)
    entry = run(live, with_audio(image_workflow(seed=9, batch=2), "alone"))
    assert blue_values(live.master.saved_images(entry, "5")) == [9, 9]
    assert torch.equal(saved_audio(live, "alone")["waveform"], joined([9]))


def test_split_mode_audio_is_what_one_gpu_renders(live):
    prompt = with_audio(split_workflow(batch=7), "split", seed=500, latent=["1", 0])
    entry = run(live, prompt)
    assert batch_indices(live.master.saved_images(entry, "5")) == list(range(7))
    # one stretch per global batch index, joined in index order however the batch was shared out
    assert torch.equal(saved_audio(live, "split")["waveform"], joined([500 + i for i in range(7)]))
    assert len({p["port"] for p in live.probes() if p["label"] == "split"}) == 3


def test_split_mode_audio_that_is_not_from_the_split_is_refused(live):
    prompt = with_audio(split_workflow(batch=4), "split-bad", seed=500)
    resp = live.master.post("/prompt", {"prompt": prompt, "client_id": "tests"})
    assert resp.status_code == 400, resp.text
    assert "Distributed Empty Latent" in resp.json()["error"]["message"]
    assert not live.probes()


def test_a_second_collector_passes_the_gathered_audio_on_once(live):
    prompt = image_workflow(seed=100, batch=1)
    prompt["6"] = {"class_type": "ImageInvert", "inputs": {"image": ["4", 0]}}
    prompt["7"] = {"class_type": "MultiGPUCollector", "inputs": {"images": ["6", 0], "audio": ["4", 1]}}
    prompt["8"] = {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "chained"}}
    prompt = with_audio(prompt, "chained")
    prompt["21"]["inputs"]["audio"] = ["7", 1]
    entry = run(live, prompt)
    assert len(live.master.saved_images(entry, "8")) == 3
    assert torch.equal(saved_audio(live, "chained")["waveform"], joined([100, 101, 102]))


def test_an_audio_output_used_without_an_audio_input_is_refused(live):
    prompt = with_audio(image_workflow(seed=1, batch=1), "unconnected")
    del prompt["4"]["inputs"]["audio"]
    resp = live.master.post("/prompt", {"prompt": prompt, "client_id": "tests"})
    assert resp.status_code == 400, resp.text
    message = resp.json()["error"]["message"]
    assert "DistributedTestSaveValue (node 21)" in message and "audio input" in message, message
    assert not live.probes()


def test_a_mismatched_sample_rate_fails_the_job_and_says_why(live):
    prompt = with_audio(image_workflow(seed=3, batch=1), "mismatch", sample_rate=["30", 0])
    prompt["30"] = {"class_type": "DistributedSeed", "inputs": {"seed": 24000}}  # 24000, 24001, 24002 Hz
    entry = live.master.wait_prompt(live.master.queue_prompt(prompt), 120)
    message = error_of(entry)
    assert "sample rates" in message and "24000 Hz" in message and "24001 Hz" in message, message
    assert "master (unit 0)" in message and "worker1 (unit 1)" in message and "worker2 (unit 2)" in message
    assert "resample" in message
    assert not (live.master.dirs["output"] / "mismatch.pt").exists()
    assert live.master.get("/distributed/status").json()["jobs"] == []


def test_something_that_is_not_audio_in_the_audio_input_is_a_clear_error(live):
    prompt = image_workflow(seed=1, batch=1)
    prompt["4"]["inputs"]["audio"] = ["2", 0]  # an IMAGE
    resp = live.master.post("/prompt", {"prompt": prompt, "client_id": "tests"})
    if resp.status_code == 400:  # ComfyUI from mid-2024 validates optional inputs when queued
        assert "audio" in resp.text
        return
    # ComfyUI of early 2024 validates nothing upstream of an optional input: the node says it when it runs
    entry = live.master.wait_prompt(resp.json()["prompt_id"], 120)
    assert "not AUDIO" in error_of(entry), error_of(entry)
    wait_until(lambda: live.master.get("/distributed/status").json()["jobs"] == [], 30, what="the job to end")


def test_a_worker_killed_mid_job_still_gives_every_audio_part_once(live):
    live.reset_config(live.default_config(job_timeout=8))
    victim, other = live.workers
    seed = 70
    prompt = with_audio(image_workflow(seed=seed, batch=1, seconds_per_image=3.0, label="audio-death"), "killed")
    prompt_id = live.master.queue_prompt(prompt)

    def running_on(instance):
        return bool(instance.get("/queue").json()["queue_running"])
    try:
        wait_until(lambda: running_on(victim), 60, interval=0.1, what=f"{victim.name} to run its share")
        time.sleep(0.5)  # inside the probe's 3 s
        victim.signal(signal.SIGKILL)
        victim.process.wait(30)
        entry = live.master.wait_prompt(prompt_id, 180)
        assert error_of(entry) == "", error_of(entry)
        assert blue_values(live.master.saved_images(entry, "5")) == [seed, seed + 1, seed + 2]
        # worker1's unit (its seed, its audio) was rendered by worker2 instead: same audio, in place, once
        assert torch.equal(saved_audio(live, "killed")["waveform"], joined([seed, seed + 1, seed + 2]))
        ports = [p["port"] for p in live.probes() if p["label"] == "audio-death"]
        assert victim.port not in ports and ports.count(other.port) == 2, ports
        job = live.master.get("/distributed/status").json()["recent"][0]
        assert any(victim.name in n for n in job["notices"]), json.dumps(job)
    finally:
        if victim.process.poll() is not None:
            victim.start().wait_ready()
