"""Who made each image of a Collector's batch, and the workflow that makes that image again.

A Save Image after a Collector writes every image of the batch on the master, and ComfyUI embeds
the same metadata in each: the prompt and workflow as queued. Dragging a worker's image back into
ComfyUI would then render the master's image. Here each image gets its own:

- ``origins(job, owners)`` and ``per_image``: for each image of the batch, in order, its unit
  (seed slot or batch index), the participant whose seed and values it has, and who rendered it
  (another worker after a failure: "worker2 (for worker1)"); with the prompt as queued
  (``queued``: the master runs another version of it).
- ``texts(prompt, extra, origin)``: that image's text entries. In multiply mode the queued prompt
  and workflow are changed so that the master's own slot renders this image: each Distributed
  Seed set to the image's seed, each Distributed Value's ``master`` line set to the participant's
  value. In split mode the queued workflow already makes the whole batch with each image at its
  index; a Distributed Value is set to give every participant the renderer's value. A
  ``distributed`` entry names the participant.

Plain logic on plain values; the glue attaches the origins to the Collector's output and the PNG
saving (encode.py) writes the texts.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from .plan import MASTER_ID, seed_for
from .values import VALUE
from .workflow import FIELD, SEED, Prompt, nodes_of

KEY = "distributed"         # the PNG text entry that names the participant


@dataclass(frozen=True)
class Origin:
    unit: int          # the seed slot (multiply mode) or the global batch index (split mode)
    participant: str   # whose seed slot and values (multiply); who rendered it (split)
    rendered_by: str   # the renderer's label, "worker2 (for worker1)" after a rescue
    split: bool
    job: str


def origins(job: Any, owners: dict[int, str]) -> list[Origin]:
    """Each unit's origin for ``job`` (a jobs.Job), in the batch's order; ``owners`` gives each
    unit's seed-slot participant (multiply mode)."""
    renderer: dict[int, Any] = {}
    for share in job.shares.values():  # a rescue's share comes after the one it replaces
        for unit in share.units:
            if share.state == "done" or unit not in renderer:
                renderer[unit] = share
    found = []
    for unit in job.units:
        share = renderer.get(unit)
        by = share.participant if share is not None else MASTER_ID
        label = share.label if share is not None else MASTER_ID
        found.append(Origin(unit, by if job.split else owners.get(unit, by), label, bool(job.split), job.id))
    return found


@dataclass(frozen=True)
class Provenance:
    """What a gathered batch carries to the Save Image after it: the prompt as it was queued, and
    an origin for each unit of the job, or (``per_image``) for each image in the batch's order."""
    prompt: dict
    origins: list[Origin]


def queued(prompt: Any) -> Any:
    """The prompt as the browser queued it, from the prompt that the master planned from (or ran):
    without the extension's fields and the cache marks of ComfyUI of 2024 (``is_changed``)."""
    if not isinstance(prompt, dict):
        return prompt
    result = {}
    for nid, node in prompt.items():
        if isinstance(node, dict):
            node = {k: v for k, v in node.items() if k != "is_changed"}
            if isinstance(node.get("inputs"), dict) and FIELD in node["inputs"]:
                node["inputs"] = {k: v for k, v in node["inputs"].items() if k != FIELD}
        result[nid] = node
    return result


def per_image(made: Provenance | None, count: int) -> Provenance | None:
    """The provenance of ``count`` images gathered for the units of ``made`` (each unit renders
    the same number); None when they do not divide evenly."""
    if made is None or not made.origins or count % len(made.origins):
        return None
    per = count // len(made.origins)
    return Provenance(made.prompt, [origin for origin in made.origins for _ in range(per)])


ATTRIBUTE = "distributed_provenance"  # where the Collector's output batch carries its Provenance


def batch_texts(images: Any, prompt: Any, extra: Any) -> list[dict[str, str]] | None:
    """The text entries of each image of a batch that a Collector gathered (see texts), or None
    for any other batch (one that a node after the Collector made, say). ``prompt`` is the one the
    Save Image was given; the batch's own, as queued, takes its place."""
    found = getattr(images, ATTRIBUTE, None)
    if not isinstance(found, Provenance) or len(images) != len(found.origins):
        return None
    made: dict[Origin, dict[str, str]] = {}  # the images of one unit share their texts
    for origin in found.origins:
        if origin not in made:
            made[origin] = texts(found.prompt, extra, origin)
    return [made[origin] for origin in found.origins]


def _value_lines(text: str) -> list[tuple[str, str]]:
    # values.lines checks the lines against the participants of now; these were checked when queued
    rows = []
    for row in str(text).splitlines():
        name, sep, value = row.partition(":")
        if sep and name.strip() and not row.lstrip().startswith("#"):
            rows.append((name.strip(), value.strip()))
    return rows


def _values_for(inputs: dict, origin: Origin) -> tuple[str, str] | None:
    """A Distributed Value's (default, values) that give the master this image's value, or None
    when they stay as queued."""
    default, text = inputs.get("default", ""), inputs.get("values", "")
    if not isinstance(default, str) or not isinstance(text, str):
        return None
    rows = _value_lines(text)
    value = next((v for name, v in rows if name == origin.participant and v), None)
    if origin.split:  # every participant renders the renderer's value: the batch comes back as it was
        return (default if value is None else value), ""
    if origin.participant == MASTER_ID:
        return None
    kept = [row for row in text.splitlines() if row.partition(":")[0].strip() != MASTER_ID or not row.partition(":")[1]]
    lines = ([f"{MASTER_ID}: {value}"] if value is not None else []) + kept
    return default, "\n".join(lines)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def changes(prompt: Prompt, origin: Origin) -> dict[str, dict[str, Any]]:
    """node id -> {input: value} that make this image on the master's slot."""
    found: dict[str, dict[str, Any]] = {}
    if not origin.split:
        for nid in nodes_of(prompt, SEED):
            inputs = prompt[nid].get("inputs") or {}
            seed, step = _int(inputs.get("seed")), _int(inputs.get("step", 1))
            if seed is not None and step is not None and origin.unit:
                found[nid] = {"seed": seed_for(seed, origin.unit * max(1, step))}
    for nid in nodes_of(prompt, VALUE):
        given = _values_for(prompt[nid].get("inputs") or {}, origin)
        if given is not None:
            found[nid] = {"default": given[0], "values": given[1]}
    return found


# Where the browser's workflow keeps these inputs: the node's widgets_values, by position.
WIDGETS = {SEED: {"seed": 0}, VALUE: {"default": 0, "values": 1}}


def _graph_with(graph: Any, prompt: Prompt, changed: dict[str, dict[str, Any]]) -> Any:
    if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list) or not changed:
        return graph
    result = copy.deepcopy(graph)
    for node in result["nodes"]:
        nid = str(node.get("id")) if isinstance(node, dict) else None
        if nid not in changed or node.get("type") != prompt[nid].get("class_type"):
            continue
        widgets = node.get("widgets_values")
        for name, value in changed[nid].items():
            index = WIDGETS.get(node["type"], {}).get(name)
            if isinstance(widgets, list) and index is not None and index < len(widgets) \
                    and type(widgets[index]) is type(value):
                widgets[index] = value
    return result


def texts(prompt: Any, extra: Any, origin: Origin) -> dict[str, str]:
    """One image's PNG text entries, as ComfyUI's Save Image writes them (``prompt``, then each
    entry of extra_pnginfo, as JSON), for this image; with ``distributed`` naming who made it."""
    found: dict[str, str] = {}
    tag = {"participant": origin.participant, "rendered_by": origin.rendered_by, "unit": origin.unit,
           "mode": "split" if origin.split else "multiply", "job": origin.job}
    if isinstance(prompt, dict):
        changed = changes(prompt, origin)
        mine = dict(prompt)
        for nid, inputs in changed.items():
            mine[nid] = {**prompt[nid], "inputs": {**(prompt[nid].get("inputs") or {}), **inputs}}
        found["prompt"] = json.dumps(mine)
        for key, value in (extra.items() if isinstance(extra, dict) else ()):
            found[key] = json.dumps(_graph_with(value, prompt, changed) if key == "workflow" else value)
        seeds = [mine[nid]["inputs"]["seed"] for nid in nodes_of(mine, SEED)
                 if _int((mine[nid].get("inputs") or {}).get("seed")) is not None]
        if seeds:
            tag["seed"] = seeds[0]
    found[KEY] = json.dumps(tag)
    return found
