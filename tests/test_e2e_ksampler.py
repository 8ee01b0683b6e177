"""Split mode with a real KSampler on a real (random-weight, SD1.5-shaped) checkpoint: the images
equal a single-instance run of the whole batch."""
from __future__ import annotations

import numpy as np
import pytest

from distributed_core import sandbox
from harness import CHECKPOINT, build_checkpoint, error_of, latent, link_checkpoint, txt2img

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="session")
def checkpoint(cluster):
    """Built once per machine (deterministic), linked into the cluster's ComfyUI."""
    built = build_checkpoint(cluster.tree, sandbox.CACHE / CHECKPOINT)
    return link_checkpoint(cluster.tree, built)


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
    reference = render(live, txt2img(latent("plain", 64, batch)))

    shared = live.default_config()
    shared["workers"][1]["enabled"] = False  # master + one worker: two SD1.5 models in RAM are enough
    live.reset_config(shared)
    try:
        split = render(live, txt2img(latent("split", 64, batch)))
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
