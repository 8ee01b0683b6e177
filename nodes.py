"""The extension's ComfyUI nodes. They only read what the master's rewrite left for them and hand
work to distributed_core; the logic lives there."""
from __future__ import annotations

import functools
import json
import logging
import time

import numpy as np
import torch

import comfy.model_management
import comfy.utils

from .distributed_core import comfy_internals, plan, provenance, spread, spread_queue, tile_render, tiles, wire, workflow
from .distributed_core.audio import AudioError, join as join_audio, per_part, sound as audio_part
from .distributed_core.client import InstanceError, Interrupted, deliver
from .distributed_core.jobs import JobFailed, JobState
from .distributed_core.runtime import Runtime
from .distributed_core.tile_render import as_array as _as_array
from .distributed_core.upscale import Lease, UpscaleState
from .distributed_core.vault import Refused

log = logging.getLogger("comfyui-distributed")

HIDDEN = {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"}
_runtime: Runtime | None = None  # handed over by the entry point once setup has built it


def attach(runtime: Runtime | None) -> None:
    """The entry point hands the nodes the runtime that setup built (distributed_core/runtime.py)."""
    global _runtime
    _runtime = runtime


def runtime() -> Runtime:
    if _runtime is None:
        raise RuntimeError("ComfyUI-Distributed did not start: see the log at ComfyUI's start")
    return _runtime
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


NO_AUDIO_RATE = 44100  # the rate of the empty AUDIO a Collector without an audio input hands on


def _sounds(values: list) -> list:
    """The Collector's audio input (one value per list item) as checked audio.Sound parts."""
    found = []
    for i, value in enumerate(values):
        waveform = value.get("waveform") if isinstance(value, dict) else None
        if not hasattr(waveform, "detach"):
            raise RuntimeError(f"Multi-GPU Collector: the audio input got {type(value).__name__}, not AUDIO (a "
                               "waveform tensor [batch, channels, samples] and its sample_rate); connect an "
                               "AUDIO output to it.")
        try:
            found.append(audio_part(_as_array(waveform), value.get("sample_rate"),
                                     "the audio input" + (f" (item {i + 1})" if len(values) > 1 else "")))
        except AudioError as exc:
            raise RuntimeError(f"Multi-GPU Collector: {exc}") from None
    return found


def _joined(sounds: list) -> dict:
    try:
        joined = join_audio(sounds)
    except AudioError as exc:
        raise RuntimeError(f"Multi-GPU Collector: {exc}") from None
    return {"waveform": _as_tensor(joined.waveform), "sample_rate": joined.sample_rate}


def _no_audio(prompt, unique_id) -> dict:
    """What the audio output holds when the audio input is not connected: nothing uses it (the
    master refuses a prompt in which something does, and so does this node when run alone), so
    an empty AUDIO, never None."""
    prompt, node = _first(prompt), str(_first(unique_id))
    consumers = workflow.audio_consumers(prompt, node)
    if consumers:
        raise RuntimeError(f"Multi-GPU Collector: {workflow.audio_unconnected(prompt, node, consumers)}")
    return _empty_audio()


def _empty_audio() -> dict:
    return {"waveform": torch.zeros([1, 1, 0]), "sample_rate": NO_AUDIO_RATE}


def _paired(sounds: list, parts: int) -> list:
    try:
        return per_part(sounds, parts)
    except AudioError as exc:
        raise RuntimeError(f"Multi-GPU Collector: {exc}") from None


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


def _unseal(field: dict, node: str) -> str:
    """The token that this instance's prompt hook moved out of a worker-role prompt, for the
    prompt that runs now only (see distributed_core/vault.py)."""
    try:
        return runtime().vault.take(field.get("sealed"), comfy_internals.running_prompt_id())
    except RuntimeError:  # the extension did not start here, so nothing was sealed
        reason = "the extension did not start on this instance"
    except Refused as exc:
        reason = str(exc)
    log.warning("[Distributed] %s refused to deliver: %s", node, reason)
    raise RuntimeError(f"{node}: this prompt may not deliver into the master's job ({reason}). A prompt that "
                       "the master sends runs once, as it was sent; a copy of it (queued again from the "
                       "history, or by anyone who read the worker's queue) cannot deliver. Queue the "
                       "workflow on the master.")


class MultiGPUCollector:
    """Gathers the images of every GPU into one batch: the master's first, then the workers in config
    order; and the audio that goes with them, joined in the same order."""

    DESCRIPTION = ("Renders the nodes before it on every enabled GPU at once and hands one combined "
                   "batch to the nodes after it. Use Distributed Seed so every GPU draws its own images. "
                   "Audio connected to its audio input is gathered in the same order, one part after "
                   "another in time, for videos with sound.")
    CATEGORY = "distributed"
    RETURN_TYPES = ("IMAGE", "AUDIO")
    RETURN_NAMES = ("images", "audio")
    FUNCTION = "collect"
    # An output node so that a worker's prompt (which holds nothing after it) is a valid prompt.
    OUTPUT_NODE = True
    # Each participant may render several units, one list item each (see DistributedSeed).
    INPUT_IS_LIST = True

    @classmethod
    def INPUT_TYPES(cls):
        # Required, not optional: ComfyUI 2024 validates nothing upstream of an optional input. It
        # still runs what an optional input needs, so the audio's upstream renders on every GPU.
        return {"required": {"images": ("IMAGE",)},
                "optional": {"audio": ("AUDIO", {"tooltip": "Audio rendered with the images (for a video "
                                                            "with sound): each participant's part is joined "
                                                            "in time, in the order of the images. Every part "
                                                            "needs the same sample rate and channels."})},
                "hidden": HIDDEN}

    @classmethod
    def IS_CHANGED(cls, **_kwargs):
        return float("nan")  # never from the cache: every run is a new job

    def collect(self, images=None, audio=None, prompt=None, unique_id=None):
        batches = list(images or [])
        sounds = None if audio is None else _sounds(list(audio))
        job = workflow.read_field(_first(prompt), _first(unique_id))
        role = (job or {}).get("role")
        if role in (None, "pass"):  # not distributed (nobody else enabled, or a worker run by hand),
            if not batches:         # or after another Collector: its inputs are gathered already
                raise RuntimeError("Multi-GPU Collector: connect an image input.")
            if sounds is None:
                return (_concat(batches), _no_audio(prompt, unique_id))
            return (_concat(batches), _joined(_paired(sounds, len(batches))))
        if role == "error":
            raise RuntimeError(f"Multi-GPU Collector: {job['error']}")
        if role == "worker":
            return (self._send(job, batches, sounds), _empty_audio())  # nothing follows it on a worker
        return self._gather(job, batches, sounds, prompt, unique_id)

    @staticmethod
    def _send(job: dict, batches: list, sounds: list | None) -> torch.Tensor:
        chunks = job["chunks"]
        batches = _per_chunk(batches, chunks)
        sounds = [None] * len(chunks) if sounds is None else _paired(sounds, len(chunks))
        token = _unseal(job, "Multi-GPU Collector")
        deadline = time.monotonic() + float(job.get("timeout", 120))
        send = functools.partial(runtime().relays.request, token)
        for (first, count), batch, sound in zip(chunks, batches, sounds):
            comfy.model_management.throw_exception_if_processing_interrupted()
            parts = wire.frame(job["job"], job["collector"], first, count, token, batch,
                               job.get("transport", "float32"),
                               None if sound is None else (sound.waveform, sound.sample_rate))
            try:
                deliver(send, "/distributed/result", parts, deadline, comfy.model_management.processing_interrupted)
            except Interrupted:
                comfy.model_management.throw_exception_if_processing_interrupted()
                raise RuntimeError("Multi-GPU Collector: interrupted while delivering results") from None
            except InstanceError as exc:
                raise RuntimeError(f"Multi-GPU Collector: {exc}") from None
        return _concat(batches)

    @staticmethod
    def _gather(job: dict, batches: list, sounds: list | None, prompt, unique_id) -> tuple:
        """The master's Collector: its own images (and audio) go to the job, then it waits for the
        workers'. It changes no job state itself: the event loop does what it asks (fleet.from_thread)."""
        on_loop, jobs = runtime().fleet.from_thread, runtime().collectors
        job_id, collector, chunks = job["job"], job["collector"], job["chunks"]
        store = jobs.store
        try:
            if chunks:
                arrays = [_as_array(batch) for batch in _per_chunk(batches, chunks)]
                own_sounds = None if sounds is None else _paired(sounds, len(chunks))
                on_loop(jobs.local_share, job_id, collector, chunks, arrays, own_sounds)
            known = store.get(job_id)
            total = len(known.units) if known else 0
            progress = comfy.utils.ProgressBar(total)
            while True:
                done, complete = store.wait(job_id, collector, WAIT_SLICE)
                progress.update_absolute(done, total)
                if complete:
                    break
                comfy.model_management.throw_exception_if_processing_interrupted()
            made = on_loop(jobs.provenance, job_id)
            parts, gathered, notices = on_loop(jobs.collected, job_id, collector)
        except JobFailed as exc:
            on_loop(jobs.end, job_id, JobState.FAILED, str(exc))
            raise RuntimeError(f"Multi-GPU Collector: {exc}") from None
        except BaseException:
            on_loop(jobs.end, job_id, JobState.CANCELLED, "the master's Collector stopped")
            raise
        if notices:
            log.warning("[Distributed] job %s completed after recovering: %s", job_id[:8], "; ".join(notices))
        # the job says whether this Collector gathers audio: an idle master's prompt has no audio input
        sound = _no_audio(prompt, unique_id) if gathered is None else _joined(gathered)
        batch = _concat([_as_tensor(v) for v in parts])
        # Save Image writes each image with the workflow that makes it (provenance.py, encode.py)
        setattr(batch, provenance.ATTRIBUTE, provenance.per_image(made, len(batch)))
        return (batch, sound)


class DistributedSeed:
    """Gives every participant its own seed: the master keeps the seed, unit k gets seed + k x step."""

    DESCRIPTION = ("Connect to a sampler's seed. The master renders with the seed as it is, each worker "
                   "with seed + its slot number x step, so every GPU makes different images and the same "
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
                "optional": {"step": ("INT", {"default": 1, "min": 1, "max": 0xFFFFFFFF,
                                              "tooltip": "How far apart the participants' seeds are. Set "
                                                         "it to the number of participants or more when you "
                                                         "raise the seed by one between runs, so that no "
                                                         "image repeats; the example uses a large step to "
                                                         "give each participant a very different colour."})},
                "hidden": HIDDEN}

    def seed(self, seed, step=1, prompt=None, unique_id=None):
        units = _assigned(workflow.read_field(prompt, unique_id), "units", [0], "Distributed Seed")
        return ([plan.seed_for(seed, unit * max(1, int(step))) for unit in units],)


class AnyType(str):
    """A type that every input accepts: ComfyUI of early 2024 compares types with ``!=``, later
    versions accept "*" by name."""

    def __ne__(self, other):
        return False


class DistributedValue:
    """Another value on each GPU: a default, and a line per participant that renders something else."""

    DESCRIPTION = ("Gives each GPU its own value for the input it feeds (a CFG, a LoRA strength, a prompt, a "
                   "sampler, a checkpoint): one line per participant, such as 'worker1: 5.5', with the ids of "
                   "the Distributed panel ('master', 'worker1', ...); the others take the default. The k-th "
                   "image of the combined batch has the k-th participant's value.")
    CATEGORY = "distributed"
    RETURN_TYPES = (AnyType("*"),)
    RETURN_NAMES = ("value",)
    FUNCTION = "value"
    OUTPUT_IS_LIST = (True,)  # one value per unit this participant renders, as Distributed Seed

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "default": ("STRING", {"default": "", "tooltip": "The value of every participant without a line below. "
                                                              "Written as the input it feeds takes it: 7.5, 20, "
                                                              "euler, a file name, true."}),
            "values": ("STRING", {"default": "", "multiline": True, "placeholder": "master: 7.0\nworker1: 5.5",
                                  "tooltip": "One 'participant: value' per line; lines starting with # are "
                                             "left out. A wrong value is refused when the prompt is queued."})},
            "hidden": HIDDEN}

    def value(self, default, values, prompt=None, unique_id=None):
        field = workflow.read_field(prompt, unique_id)
        items = (field or {}).get("items")
        if not isinstance(items, list) or not items:
            raise RuntimeError("Distributed Value: the master gives this node its values when the prompt is "
                               "queued there, and this prompt was not (a worker queued by hand, or the "
                               "extension did not start here). Queue the workflow on the master.")
        return (items,)


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
        token = _unseal(field, "Spread sender")
        parts = spread.encode_values(field["spread"], token, field["slots"], values)
        deadline = time.monotonic() + float(field.get("timeout", 120))
        send = functools.partial(runtime().relays.request, token)
        try:
            deliver(send, "/distributed/spread/result", parts, deadline, comfy.model_management.processing_interrupted)
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
        dispatcher = runtime().spread
        if dispatcher is None:
            raise RuntimeError("ComfyUI-Distributed's spread queue did not start here: see the log at ComfyUI's "
                               f"start ({runtime().spread_unsupported})")
        try:
            values = dispatcher.state.take_values(str(field["spread"]), str(field["node"]))
        except spread_queue.Interrupted:  # ends as ComfyUI's own interrupt does
            comfy.model_management.interrupt_current_processing(True)
            comfy.model_management.throw_exception_if_processing_interrupted()
            raise
        width = max([int(i) for i in field.get("outputs") or [0]] + list(values)) + 1
        return tuple(values.get(i, []) for i in range(width))



# --- Distributed Tiled Upscale ------------------------------------------------------------------------

TILE_WAIT = 0.25  # how often a waiting participant asks for a batch again
TILE_BATCH = 8    # tiles per sampler run by default: on an H200, 8 take about a fifth of the time each of 1


def _with_upscale_model(upscale_model, image: torch.Tensor) -> torch.Tensor:
    try:
        return comfy_internals.upscale_with_model(upscale_model, image)
    except comfy_internals.MissingNode as exc:
        raise RuntimeError(f"Distributed Tiled Upscale: an upscale model is connected but {exc}; disconnect "
                           "upscale_model to resize by upscale_by alone, or install that package.") from None


def _enlarge(image: torch.Tensor, upscale_by: float, upscale_model) -> np.ndarray:
    """The enlarged batch as a float32 (frames, h, w, 3) array; resized on the GPU where there is one."""
    height, width = int(image.shape[1]), int(image.shape[2])
    new_width, new_height = tiles.enlarged_size(width, height, upscale_by)
    if upscale_model is not None:
        image = _with_upscale_model(upscale_model, image)
    if tuple(image.shape[1:3]) != (new_height, new_width):
        on_device = image[..., :3].to(comfy_internals.compute_device(), torch.float32).movedim(-1, 1)
        image = comfy.utils.common_upscale(on_device, new_width, new_height, "bicubic", "disabled").movedim(1, -1)
    return _as_array(image[..., :3].clamp(0, 1))


class DistributedTiledUpscale:
    """Enlarges an image and re-renders it in batches of tiles on every enabled GPU."""

    DESCRIPTION = ("Enlarges the image (with the upscale model when one is connected, then to upscale_by) "
                   "and refines it tile by tile as img2img, tile_batch tiles per sampler run. Every enabled "
                   "GPU takes batches while any are left; the master blends them with feathered seams. Each "
                   "tile's noise comes from the seed and the tile's number, and the batches from the grid and "
                   "tile_batch alone, so the result does not depend on how many GPUs helped. A batch (video "
                   "frames) is tiled frame by frame, and its frames' tiles share batches.")
    CATEGORY = "distributed"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "upscale"
    OUTPUT_NODE = True  # so that a worker's prompt, which holds nothing after it, is a valid prompt

    @classmethod
    def INPUT_TYPES(cls):
        import comfy.samplers

        return {"required": {
            "image": ("IMAGE",), "model": ("MODEL",), "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",), "vae": ("VAE",),
            "upscale_by": ("FLOAT", {"default": 2.0, "min": 0.05, "max": 8.0, "step": 0.05}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
            "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
            "sampler_name": (comfy.samplers.KSampler.SAMPLERS,),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS,),
            "denoise": ("FLOAT", {"default": 0.35, "min": 0.0, "max": 1.0, "step": 0.01}),
            "tile_width": ("INT", {"default": 512, "min": 16, "max": 8192, "step": 8}),
            "tile_height": ("INT", {"default": 512, "min": 16, "max": 8192, "step": 8}),
            "tile_padding": ("INT", {"default": 32, "min": 0, "max": 1024, "step": 8,
                                     "tooltip": "Pixels of context around each tile, rendered and blended."}),
            "mask_blur": ("INT", {"default": 16, "min": 0, "max": 256,
                                  "tooltip": "Width of the feathered seam between tiles (at most the padding)."}),
        }, "optional": {
            "upscale_model": ("UPSCALE_MODEL",),
            "tile_batch": ("INT", {"default": TILE_BATCH, "min": 1, "max": 256,
                                   "tooltip": "Tiles rendered together in one sampler run. A batch that does "
                                              "not fit in a GPU's memory is split and retried; 1 renders "
                                              "tile by tile."}),
        }, "hidden": HIDDEN}

    @classmethod
    def IS_CHANGED(cls, **_kwargs):
        return float("nan")  # every run is a new job with its own workers

    def upscale(self, image, model, positive, negative, vae, upscale_by, seed, steps, cfg, sampler_name,
                scheduler, denoise, tile_width, tile_height, tile_padding, mask_blur, upscale_model=None,
                tile_batch=TILE_BATCH, prompt=None, unique_id=None):
        job = workflow.read_field(prompt, unique_id) or {}
        role = job.get("role")
        if role == "error":
            raise RuntimeError(f"Distributed Tiled Upscale: {job.get('error')}")
        if role == "worker":
            self._work(job, model, positive, negative, vae)
            return (image,)
        params = {"seed": int(seed), "steps": int(steps), "cfg": float(cfg), "sampler_name": sampler_name,
                  "scheduler": scheduler, "denoise": float(denoise)}
        started = time.perf_counter()
        enlarged = _enlarge(image, upscale_by, upscale_model)
        try:
            grid = tiles.Grid(int(enlarged.shape[0]), int(enlarged.shape[1]), int(enlarged.shape[2]),
                              int(tile_width), int(tile_height), int(tile_padding), int(mask_blur))
            batches = tiles.batches(len(grid), int(tile_batch))
        except tiles.TileError as exc:
            raise RuntimeError(f"Distributed Tiled Upscale: {exc}") from None
        enlarged_at = time.perf_counter()
        rendered = None
        if role == "master":
            rendered = self._share(job, enlarged, grid, params, int(tile_batch), (model, positive, negative, vae))
        if rendered is None:  # alone: every batch here, in order
            render = tile_render.Renderer(grid, enlarged, params, (model, positive, negative, vae),
                                         lambda text: log.warning("[Distributed] tiled upscale: %s", text),
                                         _check_interrupt)
            progress = comfy.utils.ProgressBar(len(grid))
            rendered = {}
            for batch in batches:
                rendered.update(zip(batch, render(batch)))
                progress.update_absolute(len(rendered), len(grid))
        rendered_at = time.perf_counter()
        result = torch.from_numpy(grid.blend(rendered, 3))
        log.info("[Distributed] tiled upscale of %d tiles in batches of %d: enlarge %.3f s, tiles %.3f s, "
                 "blend %.3f s", len(grid), int(tile_batch), enlarged_at - started, rendered_at - enlarged_at,
                 time.perf_counter() - rendered_at)
        return (result,)

    @staticmethod
    def _share(job: dict, enlarged: np.ndarray, grid, params: dict, tile_batch: int, models: tuple) -> dict | None:
        """Render batches from the job's pool beside the workers until all are in; None when the job
        is not open on this master (then the node renders alone)."""
        board = runtime().upscales.board
        job_id, node = job["job"], job["node"]
        if not board.publish(job_id, node, enlarged, grid, params, tile_batch):
            log.warning("[Distributed] upscale job %s is not open here; rendering every tile locally", job_id[:8])
            return None
        render = tile_render.Renderer(grid, enlarged, params, models,
                                      lambda text: board.notice(job_id, plan.MASTER_ID, text), _check_interrupt)
        lease_seconds = float(job.get("lease", 120))
        renders = bool(job.get("master_renders", True))
        progress = comfy.utils.ProgressBar(len(grid))
        try:
            while True:
                comfy.model_management.throw_exception_if_processing_interrupted()
                lease = Lease("wait")
                if renders or not board.workers_left(job_id):
                    lease = board.lease(job_id, node, plan.MASTER_ID, lease_seconds)
                if lease.kind == "batch":
                    board.complete(job_id, node, lease.batch, plan.MASTER_ID, render(lease.tiles))
                if lease.kind == "done":
                    break
                done, total, still_open = board.wait(job_id, node, 0 if lease.kind == "batch" else TILE_WAIT)
                if not still_open:
                    raise RuntimeError("Distributed Tiled Upscale: the job ended before its tiles were in "
                                       "(was the prompt interrupted or removed?)")
                progress.update_absolute(done, total)
            rendered = board.results(job_id, node)
        except wire.Rejected as exc:
            board.end(job_id, UpscaleState.CANCELLED, exc.message)
            raise RuntimeError(f"Distributed Tiled Upscale: {exc.message}") from None
        except BaseException:
            board.end(job_id, UpscaleState.CANCELLED, "the master's upscale stopped")
            raise
        progress.update_absolute(len(grid), len(grid))
        board.node_done(job_id, node)
        return rendered

    @staticmethod
    def _work(job: dict, model, positive, negative, vae) -> None:
        """Worker role: render leased batches for the master until none are left."""
        token = _unseal(job, "Distributed Tiled Upscale")
        tile_render.work_for_master(
            job, token, functools.partial(runtime().relays.request, token), lambda grid, enlarged, params, notice: tile_render.Renderer(
                grid, enlarged, params, (model, positive, negative, vae), notice, _check_interrupt),
            _check_interrupt, comfy.model_management.processing_interrupted, TILE_WAIT)


def _check_interrupt() -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()


NODE_CLASS_MAPPINGS = {
    "MultiGPUCollector": MultiGPUCollector,
    "DistributedSeed": DistributedSeed,
    "DistributedEmptyLatent": DistributedEmptyLatent,
    spread.SENDER: DistributedSpreadSender,
    spread.RECEIVER: DistributedSpreadReceiver,
    "DistributedTiledUpscale": DistributedTiledUpscale,
    "DistributedValue": DistributedValue,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MultiGPUCollector": "Multi-GPU Collector",
    "DistributedSeed": "Distributed Seed",
    "DistributedEmptyLatent": "Distributed Empty Latent",
    spread.SENDER: "Spread Sender (internal)",
    spread.RECEIVER: "Spread Receiver (internal)",
    "DistributedTiledUpscale": "Distributed Tiled Upscale",
    "DistributedValue": "Distributed Value",
}
