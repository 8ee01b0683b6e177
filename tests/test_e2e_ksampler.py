"""Split mode with a real KSampler on a real (random-weight, SD1.5-shaped) checkpoint: the images
equal a single-instance run of the whole batch."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from distributed_core import sandbox
from harness import error_of

pytestmark = pytest.mark.timeout(900)
CHECKPOINT = "sd15-random.safetensors"


@pytest.fixture(scope="session")
def checkpoint(cluster):
    """Built once per machine (deterministic), linked into the cluster's ComfyUI."""
    path = sandbox.CACHE / CHECKPOINT
    if not path.exists():
        builder = Path(__file__).resolve().parent / "benchmarks" / "make_checkpoint.py"
        subprocess.run([sys.executable, str(builder), str(cluster.tree), str(path)], check=True, timeout=600)
    link = cluster.tree / "models" / "checkpoints" / CHECKPOINT
    if not link.exists():
        link.symlink_to(path)
    return CHECKPOINT


def txt2img(latent: dict) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": latent,
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 1234, "steps": 2, "cfg": 7.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "MultiGPUCollector", "inputs": {"images": ["6", 0]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "ks"}},
    }


def render(cluster, prompt) -> np.ndarray:
    entry = cluster.master.wait_prompt(cluster.master.queue_prompt(prompt), 600)
    assert error_of(entry) == "", error_of(entry)
    return np.stack(cluster.master.saved_images(entry, "8")).astype(np.int16)


def test_split_mode_gives_the_single_instance_images(live, checkpoint):
    batch = 4
    alone = live.default_config()
    for worker in alone["workers"]:
        worker["enabled"] = False
    live.reset_config(alone)
    reference = render(live, txt2img({"class_type": "EmptyLatentImage",
                                      "inputs": {"width": 64, "height": 64, "batch_size": batch}}))

    shared = live.default_config()
    shared["workers"][1]["enabled"] = False  # master + one worker: two SD1.5 models in RAM are enough
    live.reset_config(shared)
    try:
        split = render(live, txt2img({"class_type": "DistributedEmptyLatent",
                                      "inputs": {"width": 64, "height": 64, "batch_size": batch}}))
        rendered_by_worker = len(live.workers[0].get("/history").json())
    finally:
        for instance in live.instances:  # give the memory back for the rest of the suite
            instance.post("/free", {"unload_models": True, "free_memory": True})
    assert split.shape == reference.shape == (batch, 64, 64, 3)
    assert rendered_by_worker >= 1, "the worker took no part"
    difference = np.abs(split - reference)
    assert difference.max() <= 2, f"max difference {difference.max()}/255"
    # and the images are not all alike: each index got its own noise
    assert np.abs(split[0] - split[1]).mean() > 5
