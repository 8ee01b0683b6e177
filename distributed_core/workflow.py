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
from dataclasses import dataclass
from typing import Any

COLLECTOR = "MultiGPUCollector"
SEED = "DistributedSeed"
LATENT = "DistributedEmptyLatent"
UPSCALE = "DistributedTiledUpscale"
DISTRIBUTED = (SEED, LATENT)
FIELD = "_distributed"
MAX_SPLIT_BATCH = 4096  # the node's own maximum
AUDIO_INPUT = "audio"   # the Collector's optional AUDIO input ...
AUDIO_OUTPUT = 1        # ... and the output that hands on what it gathered

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


def reached(prompt: Prompt, collectors: list[str], targets: list) -> list[str]:
    """The Collectors that run when ComfyUI executes only the outputs ``targets`` (the current
    frontend's partial execution)."""
    try:
        runs = upstream(prompt, [str(t) for t in targets if str(t) in prompt])
    except WorkflowError:
        return collectors  # ComfyUI's own validation names what is missing
    return [c for c in collectors if c in runs]


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


@dataclass(frozen=True)
class Layout:
    """Where each part of a workflow with Collectors runs.

    - ``fanned``: the Collectors with no other Collector before them. Every participant renders
      what they need and the master gathers it; a worker's prompt holds only these, in worker role.
    - ``chained``: Collectors after another Collector. They receive an already gathered batch and
      run once, on the master, passing it on.
    - ``gathered``: the fanned Collectors and everything after them; it runs once, on the master.
    - ``own``: what a participant renders for its own share: everything after a Distributed Seed or
      Distributed Empty Latent that is not after a Collector.
    """
    fanned: list[str]
    chained: list[str]
    gathered: set[str]
    own: set[str]


def describe(prompt: Prompt, nid: str) -> str:
    node = prompt.get(nid) or {}
    title = (node.get("_meta") or {}).get("title") if isinstance(node.get("_meta"), dict) else None
    return f"{title or node.get('class_type', '?')} (node {nid})"


def downstream(prompt: Prompt, roots) -> set[str]:
    """Every node that needs the output of some root, the roots included."""
    consumers: dict[str, list[str]] = {}
    for nid, node in prompt.items():
        for value in ((node.get("inputs") or {}) if isinstance(node, dict) else {}).values():
            if is_link(value):
                consumers.setdefault(str(value[0]), []).append(nid)
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        nid = stack.pop()
        if nid not in seen:
            seen.add(nid)
            stack.extend(consumers.get(nid, ()))
    return seen


def fanned_of(prompt: Prompt, collectors: list[str]) -> list[str]:
    """The Collectors that have no other Collector upstream of them."""
    before = {c: upstream(prompt, [c]) - {c} for c in collectors}
    return [c for c in collectors if not any(o in before[c] for o in collectors if o != c)]


def layout(prompt: Prompt, collectors: list[str]) -> Layout:
    """Work out where each node runs; refuse a workflow in which a node after a Collector takes
    something that each participant rendered for itself (only the gathered batch is known there)."""
    fanned = fanned_of(prompt, collectors)
    gathered = downstream(prompt, fanned)
    sources = [nid for nid, node in prompt.items()
               if isinstance(node, dict) and node.get("class_type") in DISTRIBUTED]
    own = downstream(prompt, sources) - gathered
    for nid in sorted(gathered - set(fanned)):
        for value in (prompt[nid].get("inputs") or {}).values():
            src = str(value[0]) if is_link(value) else None
            if src in own and prompt[src].get("class_type") not in DISTRIBUTED:
                before = [c for c in fanned if c in upstream(prompt, [nid])]
                raise WorkflowError(
                    f"{describe(prompt, nid)} comes after the Multi-GPU Collector "
                    f"{', '.join(describe(prompt, c) for c in before)} but also takes the output of "
                    f"{describe(prompt, src)}, which every GPU renders for itself before the Collector. "
                    "After a Collector only its combined batch exists: connect that node to the "
                    "Collector's output, or pass the other value through a Collector of its own.")
    return Layout(fanned, [c for c in collectors if c not in fanned], gathered, own)


def takes_audio(prompt: Prompt, nid: str) -> bool:
    """The Collector's audio input is connected: its parts carry audio beside the images."""
    return is_link((prompt[nid].get("inputs") or {}).get(AUDIO_INPUT))


def audio_consumers(prompt: Any, nid: str) -> list[str]:
    """The nodes that take a Collector's audio output."""
    if not isinstance(prompt, dict):
        return []
    return sorted(other for other, node in prompt.items() if isinstance(node, dict)
                  and any(is_link(v) and str(v[0]) == str(nid) and v[1] == AUDIO_OUTPUT
                          for v in (node.get("inputs") or {}).values()))


def audio_unconnected(prompt: Prompt, nid: str, consumers: list[str]) -> str:
    return (f"{', '.join(describe(prompt, c) for c in consumers)} takes the audio output of the Multi-GPU "
            f"Collector {describe(prompt, nid)}, but nothing is connected to that Collector's audio input. "
            "Connect the audio to gather (rendered beside the images, before the Collector) to its audio "
            "input, or give that node its audio from elsewhere.")


def check_audio(prompt: Prompt, collectors: list[str], fanned: list[str], split: bool) -> None:
    """Refuse, before anything renders, a Collector whose audio output is used while its audio
    input is not connected, and in split mode audio that does not come from the split batch (each
    GPU would give the same audio for each of its chunks, as many copies as the batch happens to
    be cut into)."""
    for nid in collectors:
        consumers = audio_consumers(prompt, nid)
        if consumers and not takes_audio(prompt, nid):
            raise WorkflowError(audio_unconnected(prompt, nid, consumers))
    if not split:
        return
    for nid in fanned:
        if not takes_audio(prompt, nid):
            continue
        source = str(prompt[nid]["inputs"][AUDIO_INPUT][0])
        if not any(prompt[u].get("class_type") == LATENT for u in upstream(prompt, [source])):
            raise WorkflowError(
                f"in split mode the audio that {describe(prompt, nid)} gathers must be rendered from the split "
                f"batch, but {describe(prompt, source)} does not depend on the Distributed Empty Latent: every "
                "GPU would give that same audio once for each part of the batch it renders. Connect it "
                "directly to the nodes after the Collector instead (it is the same on every GPU), or render "
                "the audio from the split latent.")


def _unused_id(prompt: Prompt, wanted: str) -> str:
    nid = wanted
    while nid in prompt:
        nid += "_"
    return nid


def master_prompt(prompt: Prompt, collectors: list[str], job: dict, chunks: list[list[int]],
                  seeds: list[int]) -> Prompt:
    """The master's own prompt: the whole workflow, its seed and latent nodes set to its own chunks.

    ``chunks`` holds [first unit, count] pairs, ``seeds`` the seed offset for each chunk. With no
    chunk of its own (master disabled, or a split share of 0) it renders nothing that is a share:
    every node after a Distributed node and before the Collectors leaves the prompt (a Preview of
    the decoded images, say), and each fanned Collector's input comes from a 1x1 EmptyImage, so
    that it only gathers; its audio input, if any, is left out too (the job knows whether it
    gathers audio). Chained Collectors pass their batch on. Nodes after a Collector that
    take a Distributed node's value get it as a single GPU would (the seed as it is, the whole
    latent batch): that part of the workflow runs once.
    """
    shape = layout(prompt, collectors)
    result = dict(prompt)
    if chunks:
        _set_nodes(result, prompt, [nid for nid in prompt if nid not in shape.gathered], chunks, seeds)
    else:
        for nid in shape.own:
            result.pop(nid, None)
    plain: dict[str, str] = {}
    for nid in sorted(shape.gathered - set(shape.fanned)):
        node = None
        for name, value in (prompt[nid].get("inputs") or {}).items():
            src = str(value[0]) if is_link(value) else None
            if src is None or src in shape.gathered or prompt[src].get("class_type") not in DISTRIBUTED:
                continue
            if src not in plain:
                plain[src] = _unused_id(result, f"{src}-once")
                clone = copy.deepcopy(prompt[src])
                (clone.get("inputs") or {}).pop(FIELD, None)
                result[plain[src]] = clone
            node = node or copy.deepcopy(prompt[nid])
            node["inputs"][name] = [plain[src], value[1]]
        if node is not None:
            result[nid] = node
    for nid in shape.fanned:
        node = _with_field(prompt[nid], {**job, "role": "master", "collector": nid, "chunks": chunks})
        if not chunks:
            placeholder = _unused_id(result, f"{nid}-idle")
            result[placeholder] = {"class_type": "EmptyImage",
                                   "inputs": {"width": 1, "height": 1, "batch_size": 1, "color": 0}}
            node["inputs"]["images"] = [placeholder, 0]
            node["inputs"].pop(AUDIO_INPUT, None)
        result[nid] = node
    for nid in shape.chained:
        result[nid] = _with_field(result[nid], {"role": "pass"})
    return result


def worker_prompt(prompt: Prompt, collectors: list[str], job: dict, chunks: list[list[int]],
                  seeds: list[int]) -> Prompt:
    """A worker's prompt: only what the fanned Collectors need, with them in worker role."""
    fanned = fanned_of(prompt, collectors)
    keep = upstream(prompt, fanned)
    result: Prompt = {nid: prompt[nid] for nid in keep}
    _set_nodes(result, prompt, keep, chunks, seeds)
    for nid in fanned:
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


# --- prompts that arrive with fields already in them ------------------------------------------------
# Only the master's rewrite sets FIELD. A prompt that arrives with it is either a master's dispatch
# to this instance as a worker (Collectors in worker role), or something a client made up: a
# Collector in master role would take another job's images. Worker-role prompts are run as they
# are, with their result tokens moved out of the prompt (ComfyUI shows queued prompts to anyone
# who asks); any other field is dropped and the prompt is planned as if it were new.

OURS = (COLLECTOR, SEED, LATENT, UPSCALE)
ROLED = (COLLECTOR, UPSCALE)  # nodes whose field gives them a role in a job


def screen(prompt: Any) -> tuple[str, Any]:
    """("new", prompt) without fields; ("dispatch", prompt) for a worker-role prompt; ("stripped",
    prompt without any field) for fields a client made up; ("refused", message) for a worker-role
    prompt whose other Collectors claim another role."""
    if not isinstance(prompt, dict):
        return "new", prompt
    carried = {nid: read_field(prompt, nid) for nid, node in prompt.items()
               if isinstance(node, dict) and node.get("class_type") in OURS
               and isinstance(node.get("inputs"), dict) and FIELD in node["inputs"]}
    if not carried:
        return "new", prompt
    roles = {nid: (field or {}).get("role") for nid, field in carried.items()
             if prompt[nid].get("class_type") in ROLED}
    if "worker" in roles.values():
        others = sorted(nid for nid, role in roles.items() if role != "worker")
        if others:
            return "refused", ("this prompt gives a distributed node the worker role and "
                               f"{', '.join(f'{describe(prompt, n)} the role {roles[n]!r}' for n in others)}; "
                               "only the master's own rewrite sets these roles. Queue the workflow on the "
                               "master without any _distributed input.")
        return "dispatch", prompt
    stripped = dict(prompt)
    for nid in carried:
        node = copy.deepcopy(prompt[nid])
        node["inputs"].pop(FIELD, None)
        stripped[nid] = node
    return "stripped", stripped


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


# --- Distributed Tiled Upscale ------------------------------------------------------------------------
# Workers get what the node's model, conditioning and VAE need, never the image's upstream (the master
# renders that and sends the enlarged image) nor the upscale model (the master enlarges).

UPSCALE_LOCAL_INPUTS = ("image", "upscale_model")  # what a worker's copy of the node does without


def fresh_upscales(prompt: Any) -> list[str]:
    """Upscale nodes of a submitted prompt that no rewrite has given a role yet."""
    if not isinstance(prompt, dict):
        return []
    return [nid for nid in nodes_of(prompt, UPSCALE) if FIELD not in (prompt[nid].get("inputs") or {})]


def check_upscales(prompt: Prompt, nodes: list[str]) -> None:
    """Refuse an upscale node whose output a Multi-GPU Collector gathers: every GPU would run the
    upscale for its own share there, while the tiles of one upscale are shared by every GPU."""
    collectors = nodes_of(prompt, COLLECTOR)
    for nid in nodes:
        after = [c for c in collectors if nid in upstream(prompt, [c])]
        if after:
            raise WorkflowError(
                f"{describe(prompt, nid)} comes before the Multi-GPU Collector "
                f"{', '.join(describe(prompt, c) for c in after)}. The tiled upscale already spreads its "
                "tiles over every GPU: put it after the Collector, or leave the Collector out.")


def with_fields(prompt: Prompt, nodes: list[str], data: dict) -> Prompt:
    result = dict(prompt)
    for nid in nodes:
        result[nid] = _with_field(prompt[nid], data)
    return result


def upscale_worker_prompt(prompt: Prompt, nodes: list[str], job: dict) -> Prompt:
    """A worker's prompt for an upscale job: each node in worker role with what it needs to render
    tiles, its image input a 1x1 placeholder and its upscale model left out."""
    roots = [str(value[0]) for nid in nodes for name, value in (prompt[nid].get("inputs") or {}).items()
             if name not in UPSCALE_LOCAL_INPUTS and is_link(value)]
    result: Prompt = {nid: prompt[nid] for nid in upstream(prompt, roots)} if roots else {}
    placeholder = _unused_id(prompt, "upscale-image")
    result[placeholder] = {"class_type": "EmptyImage", "inputs": {"width": 1, "height": 1, "batch_size": 1,
                                                                 "color": 0}}
    for nid in nodes:
        node = _with_field(prompt[nid], {**job, "role": "worker", "node": nid})
        for name in UPSCALE_LOCAL_INPUTS:
            node["inputs"].pop(name, None)
        node["inputs"]["image"] = [placeholder, 0]
        result[nid] = node
    return result
