"""The worker doctor: whether each participant can take part in a job, found out before the job,
and said in words a user can act on.

Plain logic on plain values: a prompt in ComfyUI's API format against an instance's ``/object_info``
(what it lacks), version strings, whether a relay gets through, and the one sentence that tells the
user what to do. The HTTP glue (distributed_routes.py) and the fleet's pre-dispatch check (fleet.send)
gather those values and call in here.
"""
from __future__ import annotations

import asyncio
import re
import time
from typing import Any, Awaitable, Callable, Iterable

from .config import EXTENSION_DIR

# Where ComfyUI looks for the file that a loader's input names, for the message ("models/<folder>").
MODEL_FOLDERS = {
    "ckpt_name": "checkpoints", "lora_name": "loras", "vae_name": "vae", "control_net_name": "controlnet",
    "unet_name": "diffusion_models", "clip_name": "text_encoders", "clip_name1": "text_encoders",
    "clip_name2": "text_encoders", "clip_name3": "text_encoders", "style_model_name": "style_models",
    "gligen_name": "gligen", "hypernetwork_name": "hypernetworks", "upscale_model_name": "upscale_models",
    "config_name": "configs", "photomaker_model_name": "photomaker",
}
CLASS_FOLDERS = {("UpscaleModelLoader", "model_name"): "upscale_models",
                 ("CLIPVisionLoader", "clip_name"): "clip_vision"}
FILE_SUFFIX = re.compile(r"\.(safetensors|sft|ckpt|pt|pth|bin|gguf|onnx|pkl|yaml|json)$", re.IGNORECASE)


# --- what an instance lacks for a prompt ----------------------------------------------------------

def prompt_problem(prompt: Any) -> str | None:
    """Why a value is not a prompt in ComfyUI's API format that the check can read (None: it is)."""
    if not isinstance(prompt, dict):
        return "the prompt must be an object of nodes"
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            return f"node {str(node_id)[:40]!r} must be an object with a class_type"
        if not isinstance(node.get("inputs", {}), dict):
            return f"node {str(node_id)[:40]!r}: its inputs must be an object"
    return None


def choices(spec: Any) -> list | None:
    """The choice list of an input as /object_info describes it: ``[[a, b], {...}]`` (every ComfyUI)
    or ``["COMBO", {"options": [a, b]}]`` (newer nodes); None for any other kind of input."""
    if not isinstance(spec, (list, tuple)) or not spec:
        return None
    if isinstance(spec[0], (list, tuple)):
        return list(spec[0])
    if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict) \
            and isinstance(spec[1].get("options"), (list, tuple)):
        return list(spec[1]["options"])
    return None


def _input_specs(node_info: Any) -> dict:
    found: dict = {}
    inputs = node_info.get("input") if isinstance(node_info, dict) else None
    for group in ("required", "optional"):
        if isinstance(inputs, dict) and isinstance(inputs.get(group), dict):
            found.update(inputs[group])
    return found


def lacking(prompt: dict, object_info: dict, input_files: Iterable[str] = ()) -> list[dict]:
    """What an instance with this ``/object_info`` lacks to run ``prompt``: node classes it does not
    have, and values of choice inputs (model files above all) that are not among its choices. Each
    entry: ``{"kind": "node" | "model" | "choice", "name", "node", "class_type", "input", "folder"}``.

    ``input_files`` are the files that loaders read from the input folder (workflow.input_files):
    they are uploaded before dispatch, so a worker's choice list may well lack them here."""
    skip = {str(name) for name in input_files}
    found: list[dict] = []
    for node_id in sorted(prompt, key=_node_order):
        node = prompt[node_id]
        if not isinstance(node, dict):
            continue
        class_type = node.get("class_type")
        if not isinstance(class_type, str):
            continue
        if class_type not in object_info:
            found.append({"kind": "node", "name": class_type, "node": str(node_id), "class_type": class_type,
                          "input": "", "folder": ""})
            continue
        specs = _input_specs(object_info[class_type])
        for name, value in (node.get("inputs") or {}).items():
            if not isinstance(value, str):
                continue  # a link, or a number: nothing a worker can lack
            options = choices(specs.get(name))
            if options is None or value in options or value.removesuffix(" [input]") in skip:
                continue
            looks_like_file = bool(FILE_SUFFIX.search(value)) or name in MODEL_FOLDERS
            found.append({"kind": "model" if looks_like_file else "choice", "name": value, "node": str(node_id),
                          "class_type": class_type, "input": name,
                          "folder": CLASS_FOLDERS.get((class_type, name)) or MODEL_FOLDERS.get(name, "")
                          if looks_like_file else ""})
    from . import values  # what a Distributed Value hands to a choice input (a checkpoint, a LoRA)
    offered = lambda cls, name: choices(_input_specs(object_info.get(cls)).get(name))  # noqa: E731
    for _value_node, node_id, name, item in values.lacking(prompt, offered):
        class_type = str(prompt[node_id].get("class_type"))
        looks_like_file = bool(FILE_SUFFIX.search(str(item))) or name in MODEL_FOLDERS
        found.append({"kind": "model" if looks_like_file else "choice", "name": str(item), "node": str(node_id),
                      "class_type": class_type, "input": name,
                      "folder": CLASS_FOLDERS.get((class_type, name)) or MODEL_FOLDERS.get(name, "")
                      if looks_like_file else ""})
    return found


def blocking(prompt: dict, object_info: dict, input_files: Iterable[str] = ()) -> list[dict]:
    """What keeps a worker out of a job: the node classes and model files it lacks. Other choices
    (a sampler an older ComfyUI lacks, say) are only reported by the check: a node may accept values
    beyond its list (ComfyUI skips the list for inputs that the node's VALIDATE_INPUTS takes), and
    the worker's own validation then says whether it can run."""
    return [e for e in lacking(prompt, object_info, input_files) if e["kind"] in ("node", "model")]


def missing_inputs(names: Iterable[str], master_has: Callable[[str], bool]) -> list[dict]:
    """Input files that the prompt's loaders read and the master lacks too. Files the master has are
    not reported: they are uploaded to each worker that lacks them (or holds a different file by
    that name) before its prompt is sent."""
    return [{"kind": "input", "name": name, "node": "", "class_type": "", "input": "", "folder": "input"}
            for name in names if not master_has(name)]


def _node_order(node_id: Any) -> tuple:
    text = str(node_id)
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


def describe_entry(entry: dict) -> str:
    name = entry.get("name", "")
    where = f"node {entry['node']} ({entry['class_type']})" if entry.get("node") else ""
    kind = entry.get("kind")
    if kind == "node":
        return f"node class {name!r}" + (f" (node {entry['node']})" if entry.get("node") else "")
    if kind == "input":
        return f"input file {name!r}"
    if kind == "model":
        folder = f"models/{entry['folder']}/" if entry.get("folder") else "model file "
        return f"{folder}{name}" + (f" ({where}, {entry['input']})" if where else "")
    return f"{entry.get('input')}={name!r}" + (f" ({where})" if where else "")


def lack_reason(entries: list[dict]) -> str:
    """Why a worker is left out of a job: what it lacks, each by name, and what to do."""
    listed = ", ".join(describe_entry(e) for e in entries[:8]) + (
        f" and {len(entries) - 8} more" if len(entries) > 8 else "")
    return f"it lacks what this workflow needs: {listed}; {_remedy(entries)}"


def _remedy(entries: list[dict]) -> str:
    kinds = {e.get("kind") for e in entries}
    steps = []
    if "model" in kinds:
        steps.append("copy the model files into that ComfyUI's models folders (or share them through "
                     "extra_model_paths.yaml)")
    if "node" in kinds:
        steps.append("install the same custom nodes there and restart it")
    if "choice" in kinds:
        steps.append("update that ComfyUI to offer the same choices as the master")
    if "input" in kinds:
        steps.append("put the input files into the master's input folder")
    return " and ".join(steps) + ", or disable it" if steps else "disable it"


# --- versions -----------------------------------------------------------------------------------------

def version_in(pyproject_text: str) -> str:
    """The ``version`` of the ``[project]`` table of a pyproject.toml (no TOML parser before Python 3.11)."""
    section = ""
    for line in pyproject_text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            section = stripped
            continue
        match = re.fullmatch(r'version\s*=\s*"([^"]+)"\s*(#.*)?', stripped)
        if section == "[project]" and match:
            return match.group(1)
    return "unknown"


def extension_version() -> str:
    try:
        return version_in((EXTENSION_DIR / "pyproject.toml").read_text(encoding="utf-8"))
    except OSError:
        return "unknown"


def comfyui_version(system_stats: Any) -> str:
    """ComfyUI's version as ``GET /system_stats`` gives it (ComfyUI from late 2024), else "unknown"."""
    system = system_stats.get("system") if isinstance(system_stats, dict) else None
    version = system.get("comfyui_version") if isinstance(system, dict) else None
    return str(version) if version else "unknown"


# --- the one sentence ------------------------------------------------------------------------------

def message(instance: dict, master_version: str) -> str:
    """What to do about one instance of a check, in one sentence (or that it is ready)."""
    role = instance.get("role", "worker")
    steps: list[str] = []
    if role == "worker" and not instance.get("reachable"):
        why = instance.get("error") or "it does not answer"
        return (f"The master cannot reach it ({why}): start it (the launcher, or Start in this panel), check its "
                "host, port and firewall, or disable it; jobs leave it out meanwhile.")
    if role == "worker" and not instance.get("extension"):
        return ("Its ComfyUI answers but ComfyUI-Distributed is not installed there: clone it into that ComfyUI's "
                "custom_nodes folder and restart it; jobs leave it out meanwhile.")
    version = instance.get("extension_version") or "unknown"
    if role == "worker" and version != master_version:
        steps.append(f"update ComfyUI-Distributed there to the master's version {master_version} (it has {version})")
    if role == "worker" and instance.get("relay") is False:
        steps.append(f"let the master open its relay there ({instance.get('relay_error') or 'no answer'}): a "
                     "proxy in front of it must pass websockets to /distributed/relay")
    if role == "worker" and instance.get("error"):
        steps.append(f"check it again ({instance['error']})")
    missing = instance.get("missing") or []
    if missing:
        listed = ", ".join(describe_entry(e) for e in missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        steps.append(f"it lacks {listed} for this workflow: {_remedy(missing)}"
                     + (" (jobs leave it out until then)" if role == "worker" else ""))
    if not steps:
        return "Ready." if role == "worker" else "Ready: this is the master."
    sentence = "; ".join(steps)
    return sentence[0].upper() + sentence[1:] + "."


# --- a short-lived cache of each worker's /object_info ---------------------------------------------------

class ObjectInfoCache:
    """Each instance's ``/object_info`` for ``ttl`` seconds (it is large: hundreds of KB to MB), one
    fetch at a time per instance: callers that arrive during a fetch share its answer."""

    def __init__(self, ttl: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self.clock = clock
        self._held: dict[str, tuple[float, dict]] = {}
        self._fetching: dict[str, asyncio.Future] = {}

    async def get(self, key: str, fetch: Callable[[], Awaitable[dict]]) -> dict:
        held = self._held.get(key)
        if held is not None and self.clock() - held[0] < self.ttl:
            return held[1]
        pending = self._fetching.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future = asyncio.get_running_loop().create_future()
        self._fetching[key] = future
        try:
            info = await fetch()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: nobody else may be waiting
            raise
        finally:
            self._fetching.pop(key, None)
        self._held[key] = (self.clock(), info)
        future.set_result(info)
        return info

    def forget(self, key: str) -> None:
        self._held.pop(key, None)


# --- the check itself: every instance at once, each step with a short timeout ---------------------------

def worker_part(prompt: dict) -> dict:
    """What a worker is sent of a prompt: the nodes its Collectors need (the whole prompt when it
    holds no Collector, as a check of a plain workflow)."""
    from . import workflow

    collectors = workflow.fresh_collectors(prompt)
    if not collectors:
        return prompt
    try:
        keep = workflow.upstream(prompt, collectors)
    except (workflow.WorkflowError, TypeError, ValueError):
        return prompt
    return {nid: node for nid, node in prompt.items() if nid in keep}


async def check(fleet, config, prompt: dict | None, master_has_input: Callable[[str], bool]) -> list[dict]:
    """Check the master and every enabled worker at once; see the README's "Worker doctor".

    ``fleet`` is the master's fleet (fleet.py: its HTTP clients, object_info cache and addresses)."""
    from . import workflow
    from .client import PROBE, InstanceError

    own_version = extension_version()
    inputs = workflow.input_files(prompt) if prompt else []
    lacking_inputs = missing_inputs(inputs, master_has_input)

    async def object_info(url: str) -> dict:
        return await fleet.object_infos.get(url, lambda: fleet.client(url).object_info(PROBE))

    async def master() -> dict:
        client = fleet.client(fleet.own_url())
        entry = {"id": "master", "name": "master", "role": "master", "url": client.url, "reachable": True,
                 "relay": None, "comfyui_version": "unknown",
                 "extension_version": own_version, "extension": True, "missing": [], "error": ""}
        stats, info = await asyncio.gather(client.system_stats(), object_info(client.url) if prompt else _none(),
                                           return_exceptions=True)
        if isinstance(stats, dict):
            entry["comfyui_version"] = comfyui_version(stats)
        if prompt and isinstance(info, dict):
            entry["missing"] = lacking(prompt, info, inputs) + lacking_inputs
        elif prompt:
            entry["missing"] = lacking_inputs
        entry["message"] = message(entry, own_version)
        return entry

    async def worker(w) -> dict:
        client = fleet.client(w.url)
        entry = {"id": w.id, "name": w.label, "role": "worker", "url": client.url, "reachable": False,
                 "relay": None, "relay_error": "",
                 "comfyui_version": "unknown", "extension_version": "", "extension": False, "missing": [],
                 "error": ""}
        stats, answer, info = await asyncio.gather(client.system_stats(), client.relay_probe(),
                                                   object_info(client.url), return_exceptions=True)
        if isinstance(stats, BaseException):
            entry["error"] = str(stats) if isinstance(stats, InstanceError) else type(stats).__name__
            entry["message"] = message(entry, own_version)
            if isinstance(stats, InstanceError):  # what the check saw, planning knows too
                fleet.reach.failed(w.url, str(stats), stats.refused)
            return entry
        fleet.reach.ok(w.url, stats if isinstance(stats, dict) else None)
        entry["reachable"] = True
        entry["comfyui_version"] = comfyui_version(stats)
        version, why = answer if isinstance(answer, tuple) else (None, str(answer))
        if version is not None:  # the relay got through to its extension, which said its version
            entry["extension"], entry["extension_version"], entry["relay"] = True, version, True
        elif isinstance(info, dict) and workflow.COLLECTOR in info:  # installed, but the relay fails
            entry["extension"], entry["relay"], entry["relay_error"] = True, False, why
            entry["extension_version"] = "an older one, without the relay" if " 404" in why or "does not exist" in why \
                else "unknown"
        if prompt:
            if isinstance(info, dict):
                part = worker_part(prompt)
                entry["missing"] = lacking(part, info, inputs) + lacking_inputs
            else:
                entry["error"] = f"its node list could not be read ({info}), so what it lacks is unknown"
        entry["message"] = message(entry, own_version)
        return entry

    workers = [w for w in config.workers if w.enabled]
    return list(await asyncio.gather(master(), *(worker(w) for w in workers)))


async def _none() -> None:
    return None
