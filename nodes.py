"""The extension's ComfyUI nodes. They only read what the master's rewrite left for them and hand
work to distributed_core; the logic lives there."""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

import comfy.model_management
import comfy.utils

from .distributed_core import plan, wire, workflow
from .distributed_core.client import InstanceError, deliver
from .distributed_core.jobs import JobFailed, JobState

log = logging.getLogger("comfyui-distributed")

HIDDEN = {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"}
WAIT_SLICE = 0.25  # how often a waiting Collector checks for an interrupt and updates its progress


def _first(value):
    return value[0] if isinstance(value, list) and value else value


def _per_unit(batches: list, units: list[int]) -> list:
    """One image batch per unit. A workflow without a Distributed Seed yields one batch for all of
    them: every unit has the same seed, so the same images."""
    if len(batches) == 1 and len(units) > 1:
        return batches * len(units)
    if len(batches) != len(units):
        raise RuntimeError(f"Multi-GPU Collector: got {len(batches)} image batches for {len(units)} shares; "
                           "a node before it produces a list of its own, which cannot be split across GPUs.")
    return batches


def _concat(batches: list) -> torch.Tensor:
    shapes = {tuple(b.shape[1:]) for b in batches}
    if len(shapes) > 1:
        raise RuntimeError(f"Multi-GPU Collector: the shares have different image sizes {sorted(shapes)}; "
                           "every participant must render the same size.")
    return batches[0] if len(batches) == 1 else torch.cat(batches, dim=0)


def _as_tensor(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.float()
    array = value
    if array.dtype == np.uint8:
        return torch.from_numpy(array).float().div_(255.0)
    return torch.from_numpy(array).float()


class MultiGPUCollector:
    """Gathers the images of every GPU into one batch: the master's first, then the workers in config order."""

    DESCRIPTION = ("Renders the nodes before it on every enabled GPU at once and hands one combined "
                   "batch to the nodes after it. Use Distributed Seed so every GPU draws its own images.")
    CATEGORY = "distributed"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    FUNCTION = "collect"
    # An output node so that a worker's prompt (which holds nothing after it) is a valid prompt.
    OUTPUT_NODE = True
    # Each participant may render several units, one list item each (see DistributedSeed).
    INPUT_IS_LIST = True

    @classmethod
    def INPUT_TYPES(cls):
        # Required, not optional: ComfyUI 2024 validates nothing upstream of an optional input.
        return {"required": {"images": ("IMAGE",)}, "hidden": HIDDEN}

    @classmethod
    def IS_CHANGED(cls, **_kwargs):
        return float("nan")  # never from the cache: every run is a new job

    def collect(self, images=None, prompt=None, unique_id=None):
        batches = list(images or [])
        job = workflow.read_field(_first(prompt), _first(unique_id))
        role = (job or {}).get("role")
        if role is None:  # not distributed (nobody else enabled, or a worker run by hand)
            if not batches:
                raise RuntimeError("Multi-GPU Collector: connect an image input.")
            return (_concat(batches),)
        if role == "error":
            raise RuntimeError(f"Multi-GPU Collector: {job['error']}")
        if role == "worker":
            return (self._send(job, batches),)
        return (self._gather(job, batches),)

    @staticmethod
    def _send(job: dict, batches: list) -> torch.Tensor:
        units = job["units"]
        batches = _per_unit(batches, units)
        deadline = time.monotonic() + float(job.get("timeout", 120))
        url = job["master_url"].rstrip("/") + "/distributed/result"
        for unit, batch in zip(units, batches):
            comfy.model_management.throw_exception_if_processing_interrupted()
            array = batch.detach().to("cpu", torch.float32).contiguous().numpy()
            header = wire.Header(job["job"], job["collector"], unit, job["token"], "float32",
                                 tuple(array.shape))
            try:
                deliver(url, header, array, deadline)
            except InstanceError as exc:
                raise RuntimeError(f"Multi-GPU Collector: {exc}") from None
        return _concat(batches)

    @staticmethod
    def _gather(job: dict, batches: list) -> torch.Tensor:
        from .distributed_routes import coordinator

        coord = coordinator()
        job_id, collector, units = job["job"], job["collector"], job["units"]
        store = coord.store
        try:
            if units:
                for unit, batch in zip(units, _per_unit(batches, units)):
                    store.put_local(job_id, collector, unit, batch)
            known = store.get(job_id)
            total = len(known.units) if known else len(units)
            progress = comfy.utils.ProgressBar(total)
            while True:
                done, complete = store.wait(job_id, collector, WAIT_SLICE)
                progress.update_absolute(done, total)
                if complete:
                    break
                comfy.model_management.throw_exception_if_processing_interrupted()
            result = _concat([_as_tensor(v) for v in store.take(job_id, collector)])
        except JobFailed as exc:
            coord.finish(job_id, JobState.FAILED, str(exc))
            raise RuntimeError(f"Multi-GPU Collector: {exc}") from None
        except BaseException:
            coord.finish(job_id, JobState.CANCELLED, "the master's Collector stopped")
            raise
        finished = store.get(job_id)
        if finished is None or finished.all_taken():
            coord.finish(job_id, JobState.DONE)
        if finished is not None and finished.notices:
            log.warning("[Distributed] job %s completed after recovering: %s", job_id[:8],
                        "; ".join(finished.notices))
        return result


class DistributedSeed:
    """Gives every participant its own seed: the master keeps the seed, unit k gets seed + k."""

    DESCRIPTION = ("Connect to a sampler's seed. The master renders with the seed as it is, each worker "
                   "with seed + its slot number, so every GPU makes different images and the same "
                   "config and seed always give the same images.")
    CATEGORY = "distributed"
    RETURN_TYPES = ("INT",)
    RETURN_NAMES = ("seed",)
    FUNCTION = "seed"
    OUTPUT_IS_LIST = (True,)  # one seed per unit this participant renders

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                              "control_after_generate": True})},
                "hidden": HIDDEN}

    def seed(self, seed, prompt=None, unique_id=None):
        field = workflow.read_field(prompt, unique_id)
        units = (field or {}).get("units") or [0]
        return ([plan.seed_for(seed, unit) for unit in units],)


NODE_CLASS_MAPPINGS = {
    "MultiGPUCollector": MultiGPUCollector,
    "DistributedSeed": DistributedSeed,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MultiGPUCollector": "Multi-GPU Collector",
    "DistributedSeed": "Distributed Seed",
}
