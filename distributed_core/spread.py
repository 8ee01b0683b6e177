"""Spreading a queue of prompts (the kind of job in spread_queue.py): which part of a prompt runs
where, and how values travel.

A prompt without a Collector is rendered whole by one participant. When a worker renders it, the
worker is sent the upstream of the prompt's output nodes plus a sender node, which posts the values
the output nodes take back to the master as one binary frame (wire.value_frame) with the claim's
token; the master then runs a version of the prompt in which each node that fed an output node is
replaced, under the same id, by a receiver node that hands over the worker's values. The output
nodes themselves run on the master: files, names, history and websocket events are those of a local
run.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Callable

from . import wire
from .comfy_internals import item_outputs, item_prompt
from .workflow import COLLECTOR, FIELD, UPSCALE, WorkflowError, describe, is_link, read_field, upstream

log = logging.getLogger("comfyui-distributed")

RECEIVER = "DistributedSpreadReceiver"
SENDER = "DistributedSpreadSender"
SENDER_ID = "spread-sender"
# The types that output nodes take which travel from a worker to the master: tensors and what
# holds them (IMAGE, MASK, LATENT, AUDIO) and plain values.
TRAVELS = ("IMAGE", "MASK", "LATENT", "AUDIO", "INT", "FLOAT", "STRING", "BOOLEAN")
MAX_SLOTS = 32           # outputs of one node that the receiver can stand in for


# --- which part runs where ----------------------------------------------------------------------

@dataclass(frozen=True)
class Split:
    """A spread prompt cut in two: the output nodes run on the master; ``sources`` (node id,
    output index, type) are the values they take, which one participant renders."""
    outputs: tuple[str, ...]
    sources: tuple[tuple[str, int, str], ...]

    def source_nodes(self) -> list[str]:
        return sorted({nid for nid, _index, _type in self.sources})

    def master_prompt(self, prompt: dict, key: str) -> dict:
        """The prompt as the master runs it once the values are in: every source node replaced,
        under its own id, by a receiver of its values. The rest stays, unexecuted, so that
        ComfyUI keeps what it has cached for those nodes."""
        result = dict(prompt)
        for nid in self.source_nodes():
            indexes = sorted({index for n, index, _type in self.sources if n == nid})
            node = {"class_type": RECEIVER,
                    "inputs": {FIELD: json.dumps({"spread": key, "node": nid, "outputs": indexes},
                                                 separators=(",", ":"))}}
            meta = prompt[nid].get("_meta") if isinstance(prompt[nid], dict) else None
            if isinstance(meta, dict):
                node["_meta"] = meta
            result[nid] = node
        return result

    def worker_prompt(self, prompt: dict, fields: dict) -> dict:
        """What a worker runs: the upstream of the source nodes and a sender node that takes each
        source value (inputs v0, v1, ... in the order of ``sources``) and posts them back."""
        keep = upstream(prompt, self.source_nodes())
        result = {nid: prompt[nid] for nid in keep}
        sender = SENDER_ID
        while sender in prompt:
            sender += "_"
        inputs: dict[str, Any] = {f"v{k}": [nid, index] for k, (nid, index, _type) in enumerate(self.sources)}
        inputs[FIELD] = json.dumps({**fields, "slots": [list(s) for s in self.sources]}, separators=(",", ":"))
        result[sender] = {"class_type": SENDER, "inputs": inputs}
        return result


def split(prompt: Any, outputs: Any, return_type: Callable[[str, int], str | None]) -> Split | str:
    """How a queued prompt spreads, or why it does not (a string). ``outputs`` are the output
    nodes ComfyUI will run (the queue item's last field); ``return_type(class_type, index)`` is
    a node class's declared output type."""
    if not isinstance(prompt, dict) or not isinstance(outputs, (list, tuple, set)):
        return "not a prompt"
    wanted = [str(o) for o in outputs if str(o) in prompt]
    if not wanted:
        return "it runs no output node"
    try:
        runs = upstream(prompt, wanted)
    except WorkflowError as exc:
        return str(exc)
    for nid in runs:
        kind = prompt[nid].get("class_type")
        if kind == COLLECTOR:
            return "it holds a Multi-GPU Collector"
        if kind == UPSCALE:
            return "it holds a Distributed Tiled Upscale, which uses every GPU already"
        if kind in (SENDER, RECEIVER):
            return "it is a spread prompt's own part"
    outs = set(wanted)
    sources: list[tuple[str, int, str]] = []
    for nid in sorted(outs):
        for value in (prompt[nid].get("inputs") or {}).values():
            if is_link(value) and str(value[0]) not in outs:
                key = (str(value[0]), int(value[1]))
                if not any(s[:2] == key for s in sources):
                    sources.append((*key, ""))
    if not sources:
        return "its output nodes take nothing that could be rendered elsewhere"
    typed = []
    for nid, index, _ in sources:
        if not 0 <= index < MAX_SLOTS:
            return f"{describe(prompt, nid)} output {index} is beyond the {MAX_SLOTS} that travel"
        kind = return_type(prompt[nid].get("class_type"), index)
        if kind not in TRAVELS:
            return (f"{describe(prompt, nid)} gives the output nodes a {kind or 'value of unknown type'}, "
                    f"which does not travel (only {', '.join(TRAVELS)} do)")
        typed.append((nid, index, kind))
    if upstream(prompt, [s[0] for s in typed]) & outs:
        return "an output node feeds a node before another output node"
    return Split(tuple(sorted(outs)), tuple(sorted(typed)))


def split_item(item: Any, return_type: Callable[[str, int], str | None]) -> Split | str:
    """How a queued item of ComfyUI's spreads (see ``split``), or why it does not."""
    prompt = item_prompt(item)
    if prompt is None:
        return "its queue item is not shaped as this extension knows"
    return split(prompt, item_outputs(item), return_type)


# --- values as a tree of plain data and arrays ----------------------------------------------------

def flatten(value: Any, arrays: list, to_array: Callable[[Any], tuple[Any, str] | None]) -> Any:
    """A JSON tree for ``value`` whose tensors are appended to ``arrays`` as (numpy array, dtype
    name). ``to_array`` turns one tensor into that pair, or None for what is not a tensor."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("a dict with keys that are not text cannot travel")
        return {"d": {k: flatten(v, arrays, to_array) for k, v in value.items()}}
    if isinstance(value, list):
        return {"l": [flatten(v, arrays, to_array) for v in value]}
    if isinstance(value, tuple):
        return {"t": [flatten(v, arrays, to_array) for v in value]}
    converted = to_array(value)
    if converted is None:
        raise TypeError(f"a value of type {type(value).__name__} cannot travel from a worker to the master")
    arrays.append(converted)
    return {"a": len(arrays) - 1}


def unflatten(tree: Any, arrays: list, from_array: Callable[[Any, str], Any]) -> Any:
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    if not isinstance(tree, dict) or len(tree) != 1:
        raise wire.FrameError("malformed value tree")
    (tag, inner), = tree.items()
    if tag == "d" and isinstance(inner, dict):
        return {k: unflatten(v, arrays, from_array) for k, v in inner.items()}
    if tag == "l" and isinstance(inner, list):
        return [unflatten(v, arrays, from_array) for v in inner]
    if tag == "t" and isinstance(inner, list):
        return tuple(unflatten(v, arrays, from_array) for v in inner)
    if tag == "a" and isinstance(inner, int) and not isinstance(inner, bool) and 0 <= inner < len(arrays):
        array, dtype = arrays[inner]
        return from_array(array, dtype)
    raise wire.FrameError(f"malformed value tree (tag {tag!r})")


def to_array(value) -> tuple[Any, str] | None:
    """A torch tensor (or numpy array) as (numpy array, dtype name) for the wire; None for
    anything else. bfloat16 travels as its raw 16 bits."""
    import numpy as np
    import torch

    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        return None
    value = value.detach().to("cpu").contiguous()
    if value.dtype == torch.bfloat16:
        return value.view(torch.int16).numpy().view(np.uint16), "bfloat16"
    name = str(value.dtype).removeprefix("torch.")
    if name not in wire.VALUE_DTYPES:
        raise TypeError(f"a tensor of {value.dtype} cannot travel from a worker to the master")
    return value.numpy(), name


def from_array(array, dtype: str):
    """The torch tensor (on the CPU) for an array that arrived."""
    import numpy as np
    import torch

    if dtype == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def decode_values(tree: Any, arrays: list) -> dict:
    """A worker's values as the receivers hand them over: source node -> {output index: the list
    of values ComfyUI keeps for that output}. Raises wire.FrameError."""
    slots = unflatten(tree, arrays, from_array)
    if not isinstance(slots, list) or not all(isinstance(s, dict) and isinstance(s.get("values"), list)
                                              and isinstance(s.get("index"), int) for s in slots):
        raise wire.FrameError("the value tree must be a list of {node, index, values}")
    values: dict = {}
    for slot in slots:
        values.setdefault(str(slot.get("node")), {})[slot["index"]] = slot["values"]
    return values


def encode_values(prompt_id: str, token: str, slots: list, values: dict) -> list:
    """The value frame a worker's sender posts: ``slots`` as in its field, ``values`` its inputs
    (v0, v1, ...: each the list of values ComfyUI keeps for that output)."""
    arrays: list = []
    tree = flatten([{"node": str(node), "index": int(index), "values": list(values.get(f"v{k}") or [])}
                    for k, (node, index, _kind) in enumerate(slots)], arrays, to_array)
    return wire.value_frame(prompt_id, token, tree, arrays)


def seal(prompt: Any, keep: Callable[[str], str]) -> Any:
    """A sender prompt as a worker queues it: each token moved out (``keep`` holds it and returns
    a key), so that the worker's GET /queue and /history name no credential."""
    if not isinstance(prompt, dict):
        return prompt
    result = prompt
    for nid, node in prompt.items():
        if not isinstance(node, dict) or node.get("class_type") != SENDER:
            continue
        found = sender_field(prompt, nid)
        if not found or not isinstance(found.get("token"), str):
            continue
        key = keep(found.pop("token"))
        result = dict(result) if result is prompt else result
        inputs = dict(node.get("inputs") or {})
        inputs[FIELD] = json.dumps({**found, "sealed": key}, separators=(",", ":"))
        result[nid] = {**node, "inputs": inputs}
    return result


def sender_field(prompt: Any, node_id: Any) -> dict | None:
    field_ = read_field(prompt, node_id)
    return field_ if field_ and "spread" in field_ else None


# --- the values a worker sends -------------------------------------------------------------------------

async def receive_values(reader, content_length: int | None, check: Callable[[wire.ValueHeader], None]):
    """Read one value frame: check its header (``check`` raises to refuse), then stream each array
    into place. Returns (header, [(array, dtype name)]). Raises wire.Rejected."""
    import numpy as np

    header = await wire.read_header(reader, content_length, "value frame",
                                    wire.value_header_length, wire.parse_value_header)
    check(header)
    arrays = []
    for dtype, shape in header.arrays:
        array = np.empty(shape, dtype=wire.VALUE_DTYPES[dtype])
        await wire.read_into(reader, memoryview(array.reshape(-1).view(np.uint8)), "value frame")
        arrays.append((array, dtype))
    await wire.read_end(reader)
    return header, arrays
