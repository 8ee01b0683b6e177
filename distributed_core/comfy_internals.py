"""Every place where the extension relies on ComfyUI beyond its node API (INPUT_TYPES, hidden
inputs, ProgressBar, interrupts, common_ksampler) and its public HTTP API. One module, so that a
new ComfyUI is checked here; each touch checks the shape it was written against and otherwise
leaves ComfyUI's own behaviour in place.

This package imports no ComfyUI: a function here is given the ComfyUI object it touches, or finds
it among the modules ComfyUI has already loaded (``sys.modules``) by the time it loads extensions.

| touch | what for | without it |
| --- | --- | --- |
| ``QueueTap`` over ``PromptQueue.get`` | the spread queue: the master skips prompts a worker renders | spread queue off, said in the panel |
| ``wrap_put`` over ``PromptQueue.put`` | the spread queue looks at once at a new prompt | it looks every 0.5 s |
| ``retime_finished`` over ``PromptQueue.task_done`` | the Queue tab times a spread prompt from when its worker got it | it shows the master's share of it (hundredths of a second) |
| ``parallel_saves`` over ``SaveImage.save_images`` | a batch's PNGs encoded on every core | one after another |
| ``restore_hidden_prompt`` over ``execution.get_input_data`` | files of spread prompts embed the prompt as submitted | they embed the master's run of it |
| ``running_prompt_id`` | a worker's credential is used only by the prompt it was queued in | a credential is taken by its key alone |
| ``upscale_with_model`` | ComfyUI's own upscale-model node, V3 ``execute`` or V1 function | a clear error |
| ``sample_batch`` over ``comfy.sample`` | the tiled upscale samples a batch of tiles, each under its own seed | one tile at a time through ``common_ksampler`` |
| ``vae_samples_latent``, ``out_of_memory_error``, ``free_gpu_cache``, ``compute_device`` | the upscale's VAE encode, its out-of-memory retry, the enlarge on the GPU | the VAE's mean; torch's error; no cache freed; the CPU |
| ``runs_partial_targets`` | plan only the Collectors a partial run reaches | every Collector planned |
| ``server_args`` | the master's listen address and port | loopback and 8188 |

Queue items: from March 2024 to today the first fields are (number, prompt id, prompt, extra data,
outputs to execute); 0.38 adds a sixth (sensitive data) and its prompt worker reads ``item[5]``.
Nothing here builds an item: ComfyUI's own item is handed back, whatever its length.

Checked by running: ComfyUI of March 2024 and 0.3.64. Read from its files: 0.38, whose shapes
(six-field items, hidden inputs inside ``v3_data``, the jobs API) the tests re-create.
"""
from __future__ import annotations

import copy
import functools
import heapq
import inspect
import logging
import sys
import time
from typing import Any, Callable

log = logging.getLogger("comfyui-distributed")

TICK_SECONDS = 0.5  # a waiting get looks again this often: what it may pick changes without notice


def _module(name: str):
    return sys.modules.get(name)


# --- queue items ---------------------------------------------------------------------------------

def item_prompt(item: Any) -> dict | None:
    """The prompt of a queue item (its third field in every ComfyUI), or None for another shape."""
    if isinstance(item, (tuple, list)) and len(item) >= 5 and isinstance(item[2], dict):
        return item[2]
    return None


def item_outputs(item: Any) -> Any:
    """The output nodes a queue item runs (its fifth field in every ComfyUI)."""
    return item[4] if item_prompt(item) is not None else None


# --- the master's prompt queue -------------------------------------------------------------------

QUEUE_ATTRIBUTES = ("mutex", "not_empty", "queue", "currently_running", "task_counter", "server", "get", "put")


def queue_problem(queue: Any) -> str:
    """'' when ``queue`` has the PromptQueue shape the tap was written against, else why not."""
    missing = [a for a in QUEUE_ATTRIBUTES if not hasattr(queue, a)]
    if missing:
        return f"ComfyUI's prompt queue has no {', '.join(missing)}"
    if not isinstance(queue.queue, list) or not isinstance(queue.currently_running, dict) \
            or not isinstance(queue.task_counter, int) or not callable(getattr(queue.server, "queue_updated", None)):
        return "ComfyUI's prompt queue is not shaped as expected"
    return ""


# pick(items) -> (the queued item to run, the prompt to run it as or None) or None when none may run now
Pick = Callable[[list], "tuple[Any, dict | None] | None"]


class QueueTap:
    """Stands in for ``PromptQueue.get`` on the master: hands the execution thread the first item
    that ``pick`` allows, with ComfyUI's own bookkeeping (the item moves to ``currently_running``
    as a deep copy, which the history keeps; the counter moves on; the queue view is told).

    The execution thread gets ComfyUI's own item, never a rebuilt one, so its length and fields
    are whatever this ComfyUI made. Where ``pick`` names another prompt to run (the spread
    queue's run with receivers), the item's prompt is given that content in place, after the copy
    that ComfyUI records was taken; ``on_swap(run prompt, submitted prompt)`` is told."""

    def __init__(self, queue, pick: Pick, active: Callable[[], bool],
                 on_swap: Callable[[dict, dict], None] = lambda run, submitted: None,
                 refresh: Callable[[], None] = lambda: None):
        self.queue = queue
        self.pick = pick
        self.active = active
        self.on_swap = on_swap
        self.refresh = refresh

    def install(self) -> None:
        self.queue.get = self.get

    def get(self, timeout=None):
        """ComfyUI's get, with the choice of item made by ``pick`` (or, while the tap is not
        active, ComfyUI's own: the lowest item). Always this one, so that turning the spread
        queue on reaches a thread that is already waiting."""
        q = self.queue
        deadline = None if timeout is None else time.monotonic() + timeout
        with q.not_empty:
            picked = self._pick()
            while picked is None:
                left = TICK_SECONDS if deadline is None else min(TICK_SECONDS, deadline - time.monotonic())
                if left <= 0:
                    return None
                q.not_empty.wait(timeout=left)
                picked = self._pick()
                if picked is None and getattr(q, "flags", None):  # /free was asked: let ComfyUI see it
                    return None
            queued, run_prompt = picked
            index = next(i for i, x in enumerate(q.queue) if x is queued)
            q.queue.pop(index)
            heapq.heapify(q.queue)
            number = q.task_counter
            recorded = copy.deepcopy(queued)
            q.currently_running[number] = recorded
            q.task_counter += 1
            prompt = item_prompt(queued)
            if run_prompt is not None and prompt is not None:
                self.on_swap(prompt, item_prompt(recorded))
                prompt.clear()
                prompt.update(run_prompt)
            q.server.queue_updated()
            return queued, number

    def _pick(self):
        q = self.queue
        if not q.queue:
            return None
        self.refresh()
        if not self.active():
            return min(q.queue), None
        return self.pick(list(q.queue))

    def present(self) -> tuple[list, set[str]]:
        """(queued items, ids of every prompt queued or running)."""
        q = self.queue
        with q.mutex:
            items = list(q.queue)
            running = [str(x[1]) for x in q.currently_running.values()]
        return items, {str(x[1]) for x in items} | set(running)


def wrap_put(queue: Any, after: Callable[[], None]) -> None:
    """``after()`` once each new item is in the queue (``PromptQueue.put(item)``, one argument in
    every ComfyUI)."""
    original = queue.put

    @functools.wraps(original)
    def put(item, *args, **kwargs):
        result = original(item, *args, **kwargs)
        after()
        return result
    queue.put = put


def retime_finished(queue: Any, started: Callable[[str], float | None]) -> bool:
    """A finished prompt that ``started(prompt_id)`` gives a start for (seconds since the epoch:
    a spread prompt that a worker rendered) has its ``execution_start`` stamped then, so the
    Queue tab and the jobs API time the render, not the master's handing on of its outputs. Wraps
    ``PromptQueue.task_done(item_id, history_result, status, ...)`` (0.38 adds ``process_item``),
    whose status is an ``ExecutionStatus`` named tuple; ComfyUI before mid-2024 stamps no message,
    and any other shape is passed on untouched."""
    original = getattr(queue, "task_done", None)
    if not callable(original) or not isinstance(getattr(queue, "currently_running", None), dict):
        return False

    @functools.wraps(original)
    def task_done(item_id, history_result, status=None, *args, **kwargs):
        try:
            item = queue.currently_running.get(item_id)
            begun = started(str(item[1])) if isinstance(item, (list, tuple)) and len(item) > 1 else None
            if begun is not None and hasattr(status, "_replace") and isinstance(getattr(status, "messages", None), list):
                status = status._replace(messages=_stamped_start(status.messages, int(begun * 1000)))
        except Exception:  # noqa: BLE001 - the entry keeps ComfyUI's own times
            log.debug("[Distributed] could not retime a finished prompt", exc_info=True)
        return original(item_id, history_result, status, *args, **kwargs)

    queue.task_done = task_done
    return True


def _stamped_start(messages: list, start_ms: int) -> list:
    result = []
    for message in messages:
        if isinstance(message, (list, tuple)) and len(message) == 2 and message[0] == "execution_start" \
                and isinstance(message[1], dict) and isinstance(message[1].get("timestamp"), (int, float)) \
                and start_ms < message[1]["timestamp"]:
            message = type(message)((message[0], {**message[1], "timestamp": start_ms}))
        result.append(message)
    return result


# --- output nodes ----------------------------------------------------------------------------------

SAVE_IMAGES_ARGS = ("self", "images", "filename_prefix", "prompt", "extra_pnginfo")  # SaveImage.save_images


def parallel_saves(deferred: Callable[..., Callable], texts_for: Callable[[Any, Any, Any], list | None]) -> bool:
    """Wrap ComfyUI's SaveImage.save_images (PreviewImage inherits it) with ``deferred`` (see
    encode.deferred_saves), each image's text entries from ``texts_for(images, prompt,
    extra_pnginfo)``; when that fails, the node's own entries stay. A ComfyUI without that V1
    method is left as it is."""
    save_image = getattr(_module("nodes"), "SaveImage", None)
    if not callable(getattr(save_image, "save_images", None)):
        return False

    def texts_of_call(args: tuple, kwargs: dict) -> list | None:
        given = {**dict(zip(SAVE_IMAGES_ARGS, args)), **kwargs}
        try:
            return texts_for(given.get("images"), given.get("prompt"), given.get("extra_pnginfo"))
        except Exception as exc:  # noqa: BLE001 - the images are saved with ComfyUI's metadata
            log.warning("[Distributed] each image's own workflow could not be embedded: %s", exc)
            return None

    save_image.save_images = deferred(save_image.save_images, texts_of_call)
    return True


def _swap_hidden(value: Any, original: Callable[[Any], Any]) -> Any:
    """``value`` with the run prompt replaced by the submitted one, in the shapes a hidden PROMPT
    takes: a one-item list (V1 input lists) or the dict itself (V3)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        found = original(value[0])
        return value if found is value[0] else [found]
    if isinstance(value, dict):
        return original(value)
    return value


def restore_hidden_prompt(original: Callable[[Any], Any]) -> bool:
    """Output nodes get the prompt as submitted where the master runs another version of it.
    ``original(prompt)`` returns the submitted prompt for a run prompt (by identity), else the
    value itself. Wraps execution.get_input_data, whose result holds the hidden PROMPT:
    - (input_data_all, ...) for V1 nodes: ``input_data_all["prompt"]`` (March 2024 returns the dict alone);
    - its third field for V3 nodes: keyed by io.Hidden in 0.3.64, nested under "hidden_inputs" in 0.38.
    Only the one run prompt is ever replaced, so every value may be looked at."""
    execution = _module("execution")
    wrapped = getattr(execution, "get_input_data", None)
    if not callable(wrapped) or getattr(wrapped, "restores_submitted_prompts", False):
        return False

    def restore(mapping: dict) -> None:
        for key in list(mapping):
            value = mapping[key]
            if key == "hidden_inputs" and isinstance(value, dict):
                restore(value)
            else:
                mapping[key] = _swap_hidden(value, original)

    @functools.wraps(wrapped)
    def get_input_data(*args, **kwargs):
        result = wrapped(*args, **kwargs)
        try:
            data = result[0] if isinstance(result, tuple) else result
            if isinstance(data, dict):
                restore(data)
            if isinstance(result, tuple) and len(result) > 2 and isinstance(result[2], dict):
                restore(result[2])
        except Exception:  # noqa: BLE001 - the files then embed the run prompt, as before
            log.debug("[Distributed] hidden prompt not restored", exc_info=True)
        return result

    get_input_data.restores_submitted_prompts = True
    execution.get_input_data = get_input_data
    return True


# --- the prompt running now -------------------------------------------------------------------------

def running_prompt_id() -> str | None:
    """The id of the prompt ComfyUI's execution thread runs: its executing context (ComfyUI from
    mid-2025) or ``PromptServer.instance.last_prompt_id`` (set before each prompt since 2023)."""
    get_context = getattr(_module("comfy_execution.utils"), "get_executing_context", None)
    if callable(get_context):
        try:
            prompt_id = getattr(get_context(), "prompt_id", None)
        except Exception:  # noqa: BLE001
            prompt_id = None
        if isinstance(prompt_id, str) and prompt_id:
            return prompt_id
    server = getattr(getattr(_module("server"), "PromptServer", None), "instance", None)
    prompt_id = getattr(server, "last_prompt_id", None)
    return prompt_id if isinstance(prompt_id, str) and prompt_id else None


# --- nodes the extension calls ---------------------------------------------------------------------

class MissingNode(RuntimeError):
    pass


def upscale_with_model(upscale_model, image):
    """ComfyUI's own "Upscale Image (using Model)", found at run time: a V3 node's classmethod
    ``execute`` (0.3.64 on; its ``upscale`` alias is marked for removal), else the V1 function."""
    node = getattr(_module("nodes"), "NODE_CLASS_MAPPINGS", {}).get("ImageUpscaleWithModel")
    if node is None:
        raise MissingNode("this ComfyUI has no ImageUpscaleWithModel node (its optional package is missing)")
    if callable(getattr(node, "define_schema", None)) and callable(getattr(node, "execute", None)):
        result = node.execute(upscale_model=upscale_model, image=image)
        result = getattr(result, "result", None) or getattr(result, "args", None) or result
    else:
        result = getattr(node(), getattr(node, "FUNCTION", "upscale"))(upscale_model=upscale_model, image=image)
    return result[0]


# --- sampling and GPU memory (the tiled upscale) ----------------------------------------------------

def _sampler_functions():
    """comfy.sample's prepare_noise and sample, where they take what common_ksampler has passed
    them since 2023 (latent and seed; model ... latent_image with denoise, disable_pbar and seed)."""
    sample = _module("comfy.sample")
    prepare, run = getattr(sample, "prepare_noise", None), getattr(sample, "sample", None)
    try:
        parameters = inspect.signature(run).parameters.values()
        inspect.signature(prepare)
    except (TypeError, ValueError):
        return None
    names = {p.name for p in parameters}
    if not ({"denoise", "disable_pbar", "seed"} <= names or any(p.kind is p.VAR_KEYWORD for p in parameters)):
        return None
    return prepare, run


def sample_batch(model, latent, seeds: list[int], params: dict, positive, negative):
    """Samples a batch of latents in one sampler run, the starting noise of each drawn from its own
    seed alone (as common_ksampler draws a batch of one). Without comfy.sample in that shape, each
    latent goes through ComfyUI's own common_ksampler on its own: the same images, one at a time."""
    functions = _sampler_functions()
    if functions is None:
        ksampler = getattr(_module("nodes"), "common_ksampler")
        return _torch().cat([
            ksampler(model, seed, params["steps"], params["cfg"], params["sampler_name"], params["scheduler"],
                     positive, negative, {"samples": latent[i:i + 1]}, denoise=params["denoise"])[0]["samples"]
            for i, seed in enumerate(seeds)])
    prepare, run = functions
    torch = _torch()
    noise = torch.cat([prepare(latent[i:i + 1], seed) for i, seed in enumerate(seeds)])
    bar = getattr(_module("comfy.utils"), "PROGRESS_BAR_ENABLED", True)
    return run(model, noise, params["steps"], params["cfg"], params["sampler_name"], params["scheduler"],
               positive, negative, latent, denoise=params["denoise"], disable_pbar=not bar, seed=seeds[0])


def vae_samples_latent(vae) -> bool:
    """Whether this VAE draws its latent from a distribution when it encodes (ComfyUI of early
    2024, from torch's global CPU generator) rather than taking its mean."""
    regularization = getattr(getattr(vae, "first_stage_model", None), "regularization", None)
    return bool(getattr(regularization, "sample", False))


def out_of_memory_error() -> type[BaseException]:
    """The exception ComfyUI raises when the GPU runs out of memory (OOM_EXCEPTION), else torch's."""
    found = getattr(_module("comfy.model_management"), "OOM_EXCEPTION", None)
    if isinstance(found, type) and issubclass(found, BaseException):
        return found
    return _torch().cuda.OutOfMemoryError


def free_gpu_cache() -> None:
    """Hands cached GPU memory back (ComfyUI's soft_empty_cache); nothing where it is missing."""
    empty = getattr(_module("comfy.model_management"), "soft_empty_cache", None)
    if callable(empty):
        empty()


def compute_device():
    """The device ComfyUI renders on (get_torch_device), else the CPU."""
    device = getattr(_module("comfy.model_management"), "get_torch_device", None)
    return device() if callable(device) else _torch().device("cpu")


def _torch():
    import torch  # ComfyUI ships torch; imported here so that plain unit tests of this module need none
    return torch


# --- the server -------------------------------------------------------------------------------------

def runs_partial_targets() -> bool:
    """Whether this ComfyUI runs only the outputs that POST /prompt names in
    partial_execution_targets (0.3.64 on: validate_prompt takes them); older ones run every output."""
    validate = getattr(_module("execution"), "validate_prompt", None)
    try:
        return validate is not None and len(inspect.signature(validate).parameters) >= 3
    except (TypeError, ValueError):
        return False


def server_args() -> tuple[list[str], int, bool]:
    """(the addresses this ComfyUI listens on, its port, whether it runs on the CPU), from its
    parsed command line (comfy.cli_args.args, the same names since 2023)."""
    args = getattr(_module("comfy.cli_args"), "args", None)
    listen = getattr(args, "listen", None) or "127.0.0.1"
    hosts = [h.strip() for h in str(listen).split(",") if h.strip()] or ["127.0.0.1"]
    try:
        port = int(getattr(args, "port", 8188))
    except (TypeError, ValueError):
        port = 8188
    return hosts, port, bool(getattr(args, "cpu", False))
