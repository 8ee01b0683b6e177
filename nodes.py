"""The extension's ComfyUI nodes. They only read what the master's rewrite left for them and hand
work to distributed_core; the logic lives there."""
from __future__ import annotations

import functools
import json
import logging
import sys
import time

import numpy as np
import torch

import comfy.model_management
import comfy.utils

from .distributed_core import encode, plan, spread, wire, workflow
from .distributed_core.client import InstanceError, Interrupted, deliver
from .distributed_core.jobs import JobFailed, JobState

log = logging.getLogger("comfyui-distributed")

HIDDEN = {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"}
WAIT_SLICE = 0.25  # how often a waiting Collector checks for an interrupt and updates its progress


def _first(value):
    return value[0] if isinstance(value, list) and value else value


def _per_chunk(batches: list, chunks: list) -> list:
    """One image batch per chunk. A multiply workflow without a Distributed Seed yields one batch
    for all of them: every chunk has the same seed, so the same images."""
    if len(batches) == 1 and len(chunks) > 1:
        return batches * len(chunks)
    if len(batches) != len(chunks):
        raise RuntimeError(f"Multi-GPU Collector: got {len(batches)} image batches for {len(chunks)} shares; "
                           "a node before it produces a list of its own, which cannot be split across GPUs.")
    return batches


def _concat(batches: list) -> torch.Tensor:
    shapes = {tuple(b.shape[1:]) for b in batches}
    if len(shapes) > 1:
        raise RuntimeError(f"Multi-GPU Collector: the shares have different image sizes {sorted(shapes)}; "
                           "every participant must render the same size.")
    return batches[0] if len(batches) == 1 else torch.cat(batches, dim=0)


def _as_array(images: torch.Tensor) -> np.ndarray:
    return images.detach().to("cpu", torch.float32).contiguous().numpy()


def _as_tensor(value: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))


def _assigned(field: dict | None, key: str, alone: list, node: str) -> list:
    """This participant's part of the job; ``alone`` when the prompt was not distributed. An empty
    part means nothing to render: the master's rewrite leaves such nodes out of its prompt, so one
    that runs anyway was not planned here, and it stops rather than render what nobody asked for."""
    if field is None or key not in field:
        return alone
    part = field[key]
    if not isinstance(part, list) or not part:
        raise RuntimeError(f"{node}: this instance was given no share of the job ({key}={part!r}), so it "
                           "has nothing to render; queue the workflow on the master instead.")
    return part


def _unseal(key) -> str | None:
    """The token that this instance's prompt hook moved out of a worker-role prompt."""
    from .distributed_routes import coordinator

    try:
        return coordinator().vault.take(key)
    except RuntimeError:  # the extension did not start here, so nothing was sealed
        return None


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
        if role == "pass":  # after another Collector: its input is gathered already
            return (_concat(batches),)
        if role == "worker":
            return (self._send(job, batches),)
        return (self._gather(job, batches),)

    @staticmethod
    def _send(job: dict, batches: list) -> torch.Tensor:
        chunks = job["chunks"]
        batches = _per_chunk(batches, chunks)
        token = job.get("token") or _unseal(job.get("sealed"))
        if not token:
            raise RuntimeError("Multi-GPU Collector: this worker holds no result token for this prompt. A "
                               "worker-role prompt runs once, as the master sent it; one queued again (from "
                               "the history, say) cannot deliver. Queue the workflow on the master.")
        deadline = time.monotonic() + float(job.get("timeout", 120))
        url = job["master_url"].rstrip("/") + "/distributed/result"
        for (first, count), batch in zip(chunks, batches):
            comfy.model_management.throw_exception_if_processing_interrupted()
            parts = wire.frame(job["job"], job["collector"], first, count, token, batch,
                               job.get("transport", "float32"))
            try:
                deliver(url, parts, deadline, comfy.model_management.processing_interrupted)
            except Interrupted:
                comfy.model_management.throw_exception_if_processing_interrupted()
                raise RuntimeError("Multi-GPU Collector: interrupted while delivering results") from None
            except InstanceError as exc:
                raise RuntimeError(f"Multi-GPU Collector: {exc}") from None
        return _concat(batches)

    @staticmethod
    def _gather(job: dict, batches: list) -> torch.Tensor:
        from .distributed_routes import coordinator

        coord = coordinator()
        job_id, collector, chunks = job["job"], job["collector"], job["chunks"]
        store = coord.store
        try:
            if chunks:
                for (first, count), batch in zip(chunks, _per_chunk(batches, chunks)):
                    store.put_local(job_id, collector, first, count, _as_array(batch))
                coord.local_done(job_id, sum(count for _first, count in chunks))
            known = store.get(job_id)
            total = len(known.units) if known else 0
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
        units = _assigned(workflow.read_field(prompt, unique_id), "units", [0], "Distributed Seed")
        return ([plan.seed_for(seed, unit) for unit in units],)


class DistributedEmptyLatent:
    """Split mode: one logical batch divided among the GPUs by batch index, with the same images
    as one GPU rendering the whole batch."""

    DESCRIPTION = ("An Empty Latent Image whose batch is split across the GPUs: each renders only "
                   "its own images (the faster ones more), with exactly the starting noise a single "
                   "GPU would give them. The Collector returns the batch in its usual order.")
    CATEGORY = "distributed"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "make"
    OUTPUT_IS_LIST = (True,)  # one latent per chunk this participant renders

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"width": ("INT", {"default": 512, "min": 16, "max": 16384, "step": 8}),
                             "height": ("INT", {"default": 512, "min": 16, "max": 16384, "step": 8}),
                             "batch_size": ("INT", {"default": 8, "min": 1, "max": 4096,
                                                    "tooltip": "The whole batch, over all GPUs."})},
                "hidden": HIDDEN}

    def make(self, width, height, batch_size, prompt=None, unique_id=None):
        chunks = _assigned(workflow.read_field(prompt, unique_id), "chunks", [[0, batch_size]],
                           "Distributed Empty Latent")
        device = getattr(comfy.model_management, "intermediate_device", lambda: torch.device("cpu"))()
        # batch_index makes KSampler draw each image's noise as the whole batch would have.
        return ([{"samples": torch.zeros([count, 4, height // 8, width // 8], device=device),
                  "batch_index": list(range(first, first + count))} for first, count in chunks],)


def encode_saves_in_parallel() -> bool:
    """Have ComfyUI's SaveImage, and PreviewImage which inherits it, encode a batch's PNGs on every
    core this instance has (see distributed_core/encode.py): on the master after a Collector, the
    batch holds every GPU's images. Guarded: a ComfyUI without that node method is left as it is."""
    save_image = getattr(sys.modules.get("nodes"), "SaveImage", None)
    if not callable(getattr(save_image, "save_images", None)) or not encode.install():
        return False
    save_image.save_images = encode.deferred_saves(save_image.save_images)
    log.info("[Distributed] PNG saves use %d threads", encode.workers())
    return True


# --- the spread queue (distributed_core/spread.py) ---------------------------------------------------

class DistributedSpreadSender:
    """On a worker: posts the values that a spread prompt's output nodes take back to the master."""

    DESCRIPTION = "Placed by the spread queue in the prompts it sends to workers; not for use by hand."
    CATEGORY = "distributed/internal"
    RETURN_TYPES = ()
    FUNCTION = "send"
    OUTPUT_NODE = True
    INPUT_IS_LIST = True  # every value of each output, as ComfyUI keeps it

    @classmethod
    def INPUT_TYPES(cls):
        # The values arrive on inputs v0, v1, ... that the master wrote into the prompt: the master
        # validated the whole prompt when it was submitted.
        return {"required": {}, "hidden": HIDDEN}

    @classmethod
    def IS_CHANGED(cls, **_kwargs):
        return float("nan")

    def send(self, prompt=None, unique_id=None, **values):
        field = spread.sender_field(_first(prompt), _first(unique_id))
        if field is None:
            raise RuntimeError("Spread sender: this node only runs in a prompt the master sent; queue the "
                               "workflow on the master.")
        token = field.get("token") or _unseal(field.get("sealed"))
        if not token:
            raise RuntimeError("Spread sender: this worker holds no token for this prompt. A prompt the master "
                               "sent runs once; one queued again (from the history, say) cannot deliver.")
        parts = spread.encode_values(field["spread"], token, field["slots"], values)
        deadline = time.monotonic() + float(field.get("timeout", 120))
        url = field["master_url"].rstrip("/") + "/distributed/spread/result"
        try:
            deliver(url, parts, deadline, comfy.model_management.processing_interrupted)
        except Interrupted:
            comfy.model_management.throw_exception_if_processing_interrupted()
            raise RuntimeError("Spread sender: interrupted while delivering values") from None
        except InstanceError as exc:
            raise RuntimeError(f"Spread sender: {exc}") from None
        return ()


class DistributedSpreadReceiver:
    """On the master: stands in for a node whose values a worker rendered, under that node's id."""

    DESCRIPTION = "Placed by the spread queue in the master's run of a prompt; not for use by hand."
    CATEGORY = "distributed/internal"
    RETURN_TYPES = ("*",) * spread.MAX_SLOTS
    OUTPUT_IS_LIST = (True,) * spread.MAX_SLOTS  # hands over each output's list as the worker had it
    FUNCTION = "receive"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}, "optional": {workflow.FIELD: ("STRING", {"default": ""})}}

    @classmethod
    def IS_CHANGED(cls, **_kwargs):
        return float("nan")

    def receive(self, **kwargs):
        try:
            field = json.loads(kwargs.get(workflow.FIELD) or "")
        except ValueError:
            field = None
        if not isinstance(field, dict) or "spread" not in field:
            raise RuntimeError("Spread receiver: this node only runs in a prompt the spread queue made.")
        from .distributed_routes import spread_state

        try:
            values = spread_state().take_values(str(field["spread"]), str(field["node"]))
        except spread.Interrupted:  # ends as ComfyUI's own interrupt does
            comfy.model_management.interrupt_current_processing(True)
            comfy.model_management.throw_exception_if_processing_interrupted()
            raise
        width = max([int(i) for i in field.get("outputs") or [0]] + list(values)) + 1
        return tuple(values.get(i, []) for i in range(width))


def restore_submitted_prompts() -> bool:
    """Give output nodes the prompt as submitted (what they embed in PNGs and other files) when
    the master runs a spread prompt with receivers. Wraps ComfyUI's execution.get_input_data,
    whose hidden PROMPT value is the prompt being run; guarded: without it, files embed the
    prompt the master ran."""
    import execution

    original = getattr(execution, "get_input_data", None)
    if not callable(original) or getattr(original, "restores_spread_prompts", False):
        return False
    from .distributed_routes import spread_state

    def swap(value):
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
            found = spread_state().original_prompt(value[0])
            return value if found is value[0] else [found]
        if isinstance(value, dict):
            return spread_state().original_prompt(value)
        return value

    @functools.wraps(original)
    def get_input_data(*args, **kwargs):
        result = original(*args, **kwargs)
        try:
            data = result[0] if isinstance(result, tuple) else result
            if isinstance(data, dict):
                for key in list(data):
                    data[key] = swap(data[key])
            if isinstance(result, tuple) and len(result) > 2 and isinstance(result[2], dict):
                for key in list(result[2]):
                    result[2][key] = swap(result[2][key])
        except RuntimeError:  # the extension did not start: nothing to restore
            pass
        return result

    get_input_data.restores_spread_prompts = True
    execution.get_input_data = get_input_data
    return True


NODE_CLASS_MAPPINGS = {
    "MultiGPUCollector": MultiGPUCollector,
    "DistributedSeed": DistributedSeed,
    "DistributedEmptyLatent": DistributedEmptyLatent,
    spread.SENDER: DistributedSpreadSender,
    spread.RECEIVER: DistributedSpreadReceiver,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MultiGPUCollector": "Multi-GPU Collector",
    "DistributedSeed": "Distributed Seed",
    "DistributedEmptyLatent": "Distributed Empty Latent",
    spread.SENDER: "Spread Sender (internal)",
    spread.RECEIVER: "Spread Receiver (internal)",
}
