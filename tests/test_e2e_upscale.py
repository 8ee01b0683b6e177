"""Distributed Tiled Upscale on real servers with a real (random-weight, SD1.5-shaped) checkpoint:
batches of tiles give the tile-by-tile result within tolerance, the master with workers gives the
master-alone result exactly, workers take part, workers that die or freeze mid-batch change nothing,
frames of a batch and uneven sizes are tiled, a batch that does not fit in (simulated) GPU memory is
split and retried, and an interrupt on the master stops the workers."""
from __future__ import annotations

import re
import signal

import numpy as np
import pytest
from PIL import Image

from distributed_core import sandbox
from harness import (CHECKPOINT, Instance, build_checkpoint, error_of, free_port, link_checkpoint, wait_until,
                     write_config)

pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="session")
def checkpoint(cluster):
    built = build_checkpoint(cluster.tree, sandbox.CACHE / CHECKPOINT)
    return link_checkpoint(cluster.tree, built)


@pytest.fixture(scope="session")
def sources(cluster):
    """Smooth random pictures in the master's input folder (only the master reads them)."""
    rng = np.random.default_rng(7)
    names = []
    for i, (width, height) in enumerate([(64, 64), (64, 64), (64, 64), (60, 44)]):
        coarse = rng.integers(0, 256, (height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
        picture = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
        name = f"upscale-source-{i}.png"
        picture.save(cluster.master.dirs["input"] / name)
        names.append(name)
    return names


def upscale_workflow(images: list[str], upscale_by: float = 2.0, tile: int = 48, steps: int = 1,
                     seed: int = 77, tile_batch: int = 1) -> dict:
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a sharp photo", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
    }
    source = None
    for i, name in enumerate(images):
        prompt[f"l{i}"] = {"class_type": "LoadImage", "inputs": {"image": name}}
        if source is None:
            source = [f"l{i}", 0]
        else:
            prompt[f"b{i}"] = {"class_type": "ImageBatch", "inputs": {"image1": source, "image2": [f"l{i}", 0]}}
            source = [f"b{i}", 0]
    prompt["5"] = {"class_type": "DistributedTiledUpscale", "inputs": {
        "image": source, "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "vae": ["1", 2],
        "upscale_by": upscale_by, "seed": seed, "steps": steps, "cfg": 7.0, "sampler_name": "euler",
        "scheduler": "normal", "denoise": 0.35, "tile_width": tile, "tile_height": tile, "tile_padding": 16,
        "mask_blur": 8, "tile_batch": tile_batch}}
    prompt["6"] = {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "upscaled"}}
    return prompt


def use_workers(live, enabled: list[bool]) -> None:
    config = live.default_config(job_timeout=30)
    for worker, on in zip(config["workers"], enabled):
        worker["enabled"] = on
    live.reset_config(config)


def render(live, prompt, during=None) -> np.ndarray:
    prompt_id = live.master.queue_prompt(prompt)
    if during is not None:
        during()
    entry = live.master.wait_prompt(prompt_id, 900)
    assert error_of(entry) == "", error_of(entry)
    return np.stack(live.master.saved_images(entry, "6")).astype(np.int16)


def tallies(log: str) -> list[dict[str, int]]:
    """Tiles per participant of each upscale job the master finished, from its log."""
    found = []
    for line in re.findall(r"upscale job \w+ done: tiles rendered by (.*)", log):
        found.append({name: int(n) for name, n in (part.rsplit(" ", 1) for part in line.split(", "))})
    return found


def log_since(instance, offset: int) -> str:
    with open(instance.log_path, "rb") as handle:
        handle.seek(offset)
        return handle.read().decode("utf-8", errors="replace")


def log_size(instance) -> int:
    return instance.log_path.stat().st_size if instance.log_path.exists() else 0


def free_memory(live) -> None:
    for instance in live.instances:
        if instance.process.poll() is None:
            try:
                instance.post("/free", {"unload_models": True, "free_memory": True}, timeout=5)
            except Exception:  # noqa: BLE001 - a frozen or dead instance frees nothing
                pass


def compare(shared: np.ndarray, alone: np.ndarray) -> None:
    assert shared.shape == alone.shape
    difference = np.abs(shared - alone)
    assert difference.max() <= 3, f"max difference {difference.max()}/255"


def share_states(live) -> dict[str, str]:
    jobs = [j for j in live.master.get("/distributed/status").json()["jobs"] if j.get("kind") == "tiles"]
    return {s["name"]: s["state"] for j in jobs for s in j["shares"]}


def identical(shared: np.ndarray, alone: np.ndarray) -> None:
    assert shared.shape == alone.shape
    difference = np.abs(shared - alone)
    assert difference.max() == 0, f"max difference {difference.max()}/255, mean {difference.mean():.4f}/255"


def test_workers_share_the_tiles_and_change_nothing(live, checkpoint, sources):
    prompt = upscale_workflow(sources[:1])
    use_workers(live, [False, False])
    try:
        alone = render(live, prompt)
        use_workers(live, [True, True])
        start = log_size(live.master)
        shared = render(live, prompt)
    finally:
        free_memory(live)
    assert alone.shape == (1, 128, 128, 3)
    compare(shared, alone)
    tally = tallies(log_since(live.master, start))
    assert len(tally) == 1 and sum(tally[0].values()) == 9, tally
    assert tally[0].get("worker1", 0) + tally[0].get("worker2", 0) >= 1, f"no worker delivered a tile: {tally}"


def test_batches_of_tiles_give_the_tile_by_tile_result_and_any_participants_the_same(live, checkpoint, sources):
    one_by_one = upscale_workflow(sources[:1], tile=32)                # 16 tiles, one per sampler run
    batched = upscale_workflow(sources[:1], tile=32, tile_batch=3)     # 6 batches, the last of 1 tile
    use_workers(live, [False, False])
    try:
        alone_single = render(live, one_by_one)
        alone = render(live, batched)
        use_workers(live, [True, True])
        start = log_size(live.master)
        shared = render(live, batched)
    finally:
        free_memory(live)
    compare(alone, alone_single)  # a batch's arithmetic differs from one tile's by float rounding only
    identical(shared, alone)      # the batches do not depend on who rendered them
    log = log_since(live.master, start)
    tally = tallies(log)
    assert len(tally) == 1 and sum(tally[0].values()) == 16, tally
    assert tally[0].get("worker1", 0) + tally[0].get("worker2", 0) >= 3, f"no worker delivered a batch: {tally}"
    assert "tiled upscale of 16 tiles in batches of 3" in log


def test_a_worker_killed_and_one_frozen_mid_upscale_change_nothing(live, checkpoint, sources):
    prompt = upscale_workflow(sources[:1], tile=32, steps=2, tile_batch=2)  # 16 tiles in 8 batches
    use_workers(live, [False, False])
    killed, frozen = live.workers[1], live.workers[0]
    try:
        alone = render(live, prompt)
        use_workers(live, [True, True])
        start = log_size(live.master)

        def strike():
            wait_until(lambda: share_states(live).get("worker1") == "running"
                       and share_states(live).get("worker2") == "running", 300, what="both workers on tiles")
            frozen.signal(signal.SIGSTOP)
            killed.signal(signal.SIGKILL)
        shared = render(live, prompt, during=strike)
    finally:
        frozen.signal(signal.SIGCONT)
        free_memory(live)
    identical(shared, alone)
    log = log_since(live.master, start)
    assert "[Distributed] worker2 failed" in log, log[-3000:]
    tally = tallies(log)
    assert len(tally) == 1 and sum(tally[0].values()) == 16 and tally[0].get("master", 0) >= 1, tally


def test_frames_of_a_batch_and_an_uneven_size_are_tiled(live, checkpoint, sources):
    video = upscale_workflow(sources[:3], tile=48, tile_batch=4)     # 3 frames of 128x128: 27 tiles, batches
    uneven = upscale_workflow(sources[3:], upscale_by=1.5, tile=32, tile_batch=4)  # of 4 across frames; 90x66:
    # 3 x 3 tiles, cut at the edges
    use_workers(live, [True, False])  # master + one worker: two models in RAM are enough
    try:
        start = log_size(live.master)
        shared_video, shared_uneven = render(live, video), render(live, uneven)
        use_workers(live, [False, False])
        alone_video, alone_uneven = render(live, video), render(live, uneven)
    finally:
        free_memory(live)
    assert alone_video.shape == (3, 128, 128, 3) and alone_uneven.shape == (1, 66, 90, 3)
    identical(shared_video, alone_video)
    identical(shared_uneven, alone_uneven)
    # each frame got its own tiles' noise: frames 0 and 1 start from different pictures and stay apart
    assert np.abs(alone_video[0] - alone_video[1]).mean() > 5
    tally = tallies(log_since(live.master, start))
    assert [sum(t.values()) for t in tally] == [27, 9], tally
    assert tally[0].get("worker1", 0) >= 1, tally


def test_a_batch_too_large_for_gpu_memory_is_split_and_retried(live, checkpoint, sources):
    """The test nodes make the sampler raise ComfyUI's out-of-memory error above 2 images on the
    master and worker1: batches of 4 are split in two there, and the job still completes."""
    prompt = upscale_workflow(sources[:1], tile=32, tile_batch=4)  # 16 tiles in 4 batches
    use_workers(live, [False, False])
    try:
        in_twos = render(live, upscale_workflow(sources[:1], tile=32, tile_batch=2))
        live.set_memory({"master": 2, "worker1": 2})
        start = log_size(live.master)
        alone = render(live, prompt)
        alone_log = log_since(live.master, start)
        use_workers(live, [True, False])
        start = log_size(live.master)
        shared = render(live, prompt)
        shared_log = log_since(live.master, start)
    finally:
        live.set_memory()
        free_memory(live)
    # split in halves, a batch of 4 is rendered as the two batches of 2 that tile_batch 2 gives
    identical(alone, in_twos)
    identical(shared, in_twos)
    assert "a batch of 4 tiles did not fit in GPU memory: split and retried" in alone_log, alone_log[-3000:]
    assert "master: a batch of 4 tiles did not fit in GPU memory" in shared_log, shared_log[-3000:]
    tally = tallies(shared_log)
    assert len(tally) == 1 and sum(tally[0].values()) == 16, tally
    if tally[0].get("worker1"):  # the worker took a batch: it split it too, and said so with the batch
        assert "worker1: a batch of 4 tiles did not fit in GPU memory" in shared_log, shared_log[-3000:]


def test_interrupting_the_master_stops_the_workers(live, checkpoint, sources):
    prompt = upscale_workflow(sources[:1], tile=16, steps=3)  # 64 tiles: long enough to interrupt
    use_workers(live, [True, False])
    worker = live.workers[0]
    try:
        prompt_id = live.master.queue_prompt(prompt)
        wait_until(lambda: share_states(live).get("worker1") == "running", 300, what="the worker on tiles")
        live.master.post("/interrupt", {})
        entry = live.master.wait_prompt(prompt_id, 120)
        wait_until(lambda: worker.idle(), 60, what="the worker to stop")
    finally:
        free_memory(live)
    statuses = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in statuses, statuses
    history = worker.get("/history").json()
    last = max(history.values(), key=lambda e: e.get("prompt", [0])[0])
    assert last["status"]["status_str"] == "error", last["status"]


def test_the_node_works_where_the_upscale_model_package_is_missing(live, checkpoint, sources, tmp_path):
    """A ComfyUI whose optional upscale-model package cannot be imported (its Load Upscale Model
    nodes then fail to load on current versions) still runs the node, with the same result."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "spandrel.py").write_text("raise ImportError('spandrel is not installed here')\n")
    config, port = tmp_path / "alone.json", free_port()
    write_config(config, {"master": {"port": port, "device": 0, "enabled": True}, "workers": [],
                          "settings": {"mode": "parallel"}})
    env = {**live.env, "PYTHONPATH": f"{blocker}:{live.env.get('PYTHONPATH', '')}".rstrip(":"),
           "COMFYUI_DISTRIBUTED_CONFIG": str(config)}
    bare = Instance(live.tree, "no-spandrel", port, tmp_path, env)
    prompt = upscale_workflow(sources[:1])
    use_workers(live, [False, False])
    try:
        alone = render(live, prompt)
        free_memory(live)
        bare.start().wait_ready()
        (bare.dirs["input"] / sources[0]).write_bytes((live.master.dirs["input"] / sources[0]).read_bytes())
        nodes = bare.get("/object_info").json()
        entry = bare.wait_prompt(bare.queue_prompt(prompt), 900)
        assert error_of(entry) == "", error_of(entry)
        without = np.stack(bare.saved_images(entry, "6")).astype(np.int16)
    finally:
        bare.stop()
        free_memory(live)
    assert "DistributedTiledUpscale" in nodes
    assert "upscale_model" in nodes["DistributedTiledUpscale"]["input"]["optional"]
    if "spandrel" in (live.tree / "comfy_extras" / "nodes_upscale_model.py").read_text():
        assert "ImageUpscaleWithModel" not in nodes, "the package was not blocked"
    compare(without, alone)


def tiny_upscale_model(path) -> str:
    """A 2x Real-ESRGAN Compact state dict with small random weights: both ComfyUI's old bundled
    loader and the current one's optional package read it as an upscale model."""
    import torch

    generator = torch.Generator().manual_seed(0)
    features, state = 8, {}

    def conv(name, inputs, outputs):
        state[f"{name}.weight"] = torch.randn(outputs, inputs, 3, 3, generator=generator) * 0.02
        state[f"{name}.bias"] = torch.zeros(outputs)
    conv("body.0", 3, features)
    state["body.1.weight"] = torch.full((features,), 0.25)
    conv("body.2", features, features)
    state["body.3.weight"] = torch.full((features,), 0.25)
    conv("body.4", features, 3 * 2 * 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path.name


def test_a_connected_upscale_model_enlarges_on_the_master_only(live, checkpoint, sources):
    name = tiny_upscale_model(live.tree / "models" / "upscale_models" / "tiny-compact-x2.pth")
    prompt = upscale_workflow(sources[:1])
    prompt["m"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": name}}
    prompt["5"]["inputs"]["upscale_model"] = ["m", 0]
    use_workers(live, [False, False])
    try:
        alone = render(live, prompt)
        plain = render(live, upscale_workflow(sources[:1]))
        use_workers(live, [True, False])
        start = log_size(live.master)
        shared = render(live, prompt)
    finally:
        free_memory(live)
    compare(shared, alone)
    assert np.abs(alone - plain).mean() > 0.5, "the upscale model changed nothing"
    tally = tallies(log_since(live.master, start))
    assert tally and tally[0].get("worker1", 0) >= 1, tally
    worker_prompts = [entry["prompt"][2] for entry in live.workers[0].get("/history").json().values()]
    assert worker_prompts and not any(node.get("class_type") == "UpscaleModelLoader"
                                      for p in worker_prompts for node in p.values())
