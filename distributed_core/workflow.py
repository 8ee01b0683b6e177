"""Rewriting ComfyUI API prompts: what the master runs and what each worker runs.

A prompt is ComfyUI's API format: ``{node_id: {"class_type": str, "inputs": {name: value | [src_id, out_index]}}}``.
Our nodes find their instructions for a job in an extra input, ``FIELD``, holding a JSON string;
ComfyUI passes only declared inputs to a node, so the nodes read it back through the hidden PROMPT
and UNIQUE_ID inputs. A node that carries the field was rewritten already: that is how a worker
knows not to distribute again.
"""
from __future__ import annotations

import copy
import json
from typing import Any

COLLECTOR = "MultiGPUCollector"
SEED = "DistributedSeed"
LATENT = "DistributedEmptyLatent"
FIELD = "_distributed"
MAX_SPLIT_BATCH = 4096  # the node's own maximum

Prompt = dict[str, dict[str, Any]]


class WorkflowError(ValueError):
    pass


def is_link(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int))
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def nodes_of(prompt: Prompt, class_type: str) -> list[str]:
    return [nid for nid, node in prompt.items()
            if isinstance(node, dict) and node.get("class_type") == class_type]


def fresh_collectors(prompt: Any) -> list[str]:
    """Collectors of a newly submitted prompt; [] for anything else (not a prompt, or rewritten)."""
    if not isinstance(prompt, dict):
        return []
    found = nodes_of(prompt, COLLECTOR)
    if any(FIELD in (prompt[nid].get("inputs") or {}) for nid in found):
        return []
    return found


def upstream(prompt: Prompt, roots: list[str]) -> set[str]:
    """Every node whose output some root needs, the roots included."""
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        nid = stack.pop()
        if nid in seen:
            continue
        node = prompt.get(nid)
        if not isinstance(node, dict):
            raise WorkflowError(f"node {nid} is linked to but missing from the prompt")
        seen.add(nid)
        for value in (node.get("inputs") or {}).values():
            if is_link(value):
                stack.append(str(value[0]))
    return seen


def _with_field(node: dict, data: dict) -> dict:
    node = copy.deepcopy(node)
    node.setdefault("inputs", {})[FIELD] = json.dumps(data, separators=(",", ":"))
    return node


def split_batch(prompt: Prompt, collectors: list[str]) -> int | None:
    """The logical batch size when the Collectors' inputs come from a Distributed Empty Latent
    (split mode), or None (multiply mode)."""
    latents = [nid for nid in upstream(prompt, collectors) if prompt[nid].get("class_type") == LATENT]
    if not latents:
        return None
    if len(latents) > 1:
        raise WorkflowError("split mode takes one Distributed Empty Latent before the Collector; "
                            f"this workflow has {len(latents)}")
    size = prompt[latents[0]].get("inputs", {}).get("batch_size")
    if isinstance(size, int) and size > MAX_SPLIT_BATCH:
        raise WorkflowError(f"the Distributed Empty Latent's batch_size is {size}; at most {MAX_SPLIT_BATCH}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise WorkflowError("the Distributed Empty Latent's batch_size must be a number in the node, "
                            "not a link: the master splits it before anything runs")
    return size


def _set_nodes(result: Prompt, source: Prompt, keep, chunks: list[list[int]], seeds: list[int]) -> None:
    """Give seed and latent nodes their part: one list item per chunk."""
    for nid in keep:
        kind = source[nid].get("class_type")
        if kind == SEED:
            result[nid] = _with_field(source[nid], {"units": seeds})
        elif kind == LATENT:
            result[nid] = _with_field(source[nid], {"chunks": chunks})


def master_prompt(prompt: Prompt, collectors: list[str], job: dict, chunks: list[list[int]],
                  seeds: list[int]) -> Prompt:
    """The master's own prompt: the whole workflow, its seed and latent nodes set to its own chunks.

    ``chunks`` holds [first unit, count] pairs, ``seeds`` the seed offset for each chunk. With no
    chunk of its own (master disabled) each Collector's input comes from a 1x1 EmptyImage instead,
    so that the master renders nothing upstream of it and only gathers.
    """
    result = dict(prompt)
    _set_nodes(result, prompt, prompt, chunks, seeds)
    for nid in collectors:
        node = _with_field(prompt[nid], {**job, "role": "master", "collector": nid, "chunks": chunks})
        if not chunks:
            placeholder = f"{nid}-idle"
            result[placeholder] = {"class_type": "EmptyImage",
                                   "inputs": {"width": 1, "height": 1, "batch_size": 1, "color": 0}}
            node["inputs"]["images"] = [placeholder, 0]
        result[nid] = node
    return result


def worker_prompt(prompt: Prompt, collectors: list[str], job: dict, chunks: list[list[int]],
                  seeds: list[int]) -> Prompt:
    """A worker's prompt: only what the Collectors need, with the Collectors in worker role."""
    keep = upstream(prompt, collectors)
    result: Prompt = {nid: prompt[nid] for nid in keep}
    _set_nodes(result, prompt, keep, chunks, seeds)
    for nid in collectors:
        result[nid] = _with_field(prompt[nid], {**job, "role": "worker", "collector": nid, "chunks": chunks})
    return result


LOADERS = {"LoadImage": "image", "LoadImageMask": "image"}


def input_files(prompt: Prompt) -> list[str]:
    """Names of the files in ComfyUI's input folder that the prompt's loaders read."""
    names = []
    for node in prompt.values():
        key = LOADERS.get(node.get("class_type"))
        value = (node.get("inputs") or {}).get(key) if key else None
        if isinstance(value, str) and value:
            name = value.removesuffix(" [input]")
            if name not in names:
                names.append(name)
    return names


def read_field(prompt: Any, node_id: Any) -> dict | None:
    """What the rewrite left for a node, or None when it has nothing (a prompt run without the hook)."""
    try:
        raw = prompt[str(node_id)]["inputs"][FIELD]
    except (KeyError, TypeError):
        return None
    try:
        data = json.loads(raw)
    except (TypeError, ValueError):
        return None
    return data if isinstance(data, dict) else None
