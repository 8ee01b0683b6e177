"""The spread queue on real ComfyUI servers: a master and two CPU workers on loopback, prompts
without a Collector queued by an API client, each rendered whole by one participant and saved on
the master as if it had rendered them."""
from __future__ import annotations

import json
import signal
import time

import numpy as np
import pytest
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


def test_spread_off_renders_everything_on_the_master(live):
    ids = queue_all(live.master, [plain_workflow(k, seconds=0.1) for k in range(3)])
    for entry in finished(live.master, ids):
        assert entry["status"]["status_str"] == "success"
    assert set(renderers(live).values()) == {"master"}
