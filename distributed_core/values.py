"""Per-participant values (the Distributed Value node): one workflow, another value on each GPU, such
as a CFG, a LoRA strength, a prompt text, a sampler or a checkpoint, to compare the results in one
batch.

The node holds a default and lines of ``participant: value`` (participant ids as in gpu_config.json:
``master``, ``worker1``...). When a prompt arrives, the master's prompt hook reads the inputs the
node feeds (their type, range and choices, from the master's own node classes), parses every value
for them and refuses, with the line named, what does not fit (``resolve``). It leaves the table in the
node's field. Each prompt that a participant then renders gets, in the same field, the values of the
units it renders (``with_items``): in multiply mode a unit is a seed slot and takes the value of the
participant whose slot it is, so the k-th image of a batch always has the k-th participant's value,
whoever renders it after a failure; in split mode a chunk takes the value of the participant that
renders it. The node hands them on as a list, one item per unit, as Distributed Seed does.

Plain logic on plain values: the input specs come from the glue (``InputSpec``).
"""
from __future__ import annotations

import copy
import json
import math
from typing import Any, Callable

from .workflow import FIELD, Prompt, describe, is_link, nodes_of, read_field

VALUE = "DistributedValue"
KINDS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
MAX_LINES = 256

# (class_type, input name) -> (type, options) as the node class declares it, or None when unknown
InputSpec = Callable[[str, str], "tuple[Any, dict] | None"]


class Refused(ValueError):
    """A Distributed Value that cannot be given; the message says which node, line and input."""


def targets(prompt: Prompt, nid: str) -> list[tuple[str, str]]:
    """The (node, input) pairs that take this node's output."""
    found = []
    for tid, node in prompt.items():
        for name, value in ((node or {}).get("inputs") or {}).items() if isinstance(node, dict) else ():
            if is_link(value) and str(value[0]) == nid:
                found.append((tid, name))
    return sorted(found)


def _kind(spec: Any) -> tuple[str, dict, list | None] | None:
    """(kind, options, choices) of an input spec, or None when it is no widget value."""
    if not isinstance(spec, (list, tuple)) or not spec:
        return None
    kind, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    if isinstance(kind, (list, tuple)):  # a list of choices: ComfyUI's COMBO
        return "COMBO", options, [str(c) for c in kind]
    if kind == "COMBO":  # the V3 spelling: the choices in the options
        return "COMBO", options, [str(c) for c in options.get("options") or []]
    return (kind, options, None) if kind in KINDS else None


def parse(text: str, kind: str, options: dict, what: str) -> Any:
    """``text`` as a value of ``kind``, within the input's min and max. Raises Refused."""
    text = text.strip()
    try:
        if kind == "INT":
            value = int(text, 0) if text.lower().startswith(("0x", "0o", "0b")) else int(text)
        elif kind == "FLOAT":
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
        elif kind == "BOOLEAN":
            if text.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError
            value = text.lower() in ("true", "1", "yes", "on")
        else:
            value = text
    except ValueError:
        article = {"INT": "a whole number", "FLOAT": "a number", "BOOLEAN": "true or false"}[kind]
        raise Refused(f"{what}: {text!r} is not {article}") from None
    if kind in ("INT", "FLOAT"):
        low, high = options.get("min"), options.get("max")
        if isinstance(low, (int, float)) and value < low or isinstance(high, (int, float)) and value > high:
            raise Refused(f"{what}: {text} is outside {low} to {high}")
    return value


def lines(text: Any, participants: list[str], where: str) -> dict[str, str]:
    """``participant: value`` lines (blank lines and lines starting with # left out), by participant."""
    if not isinstance(text, str):
        raise Refused(f"{where}: values must be text, one 'participant: value' per line")
    found: dict[str, str] = {}
    rows = [r for r in text.splitlines() if r.strip() and not r.lstrip().startswith("#")]
    if len(rows) > MAX_LINES:
        raise Refused(f"{where}: at most {MAX_LINES} lines of values")
    for row in rows:
        name, sep, value = row.partition(":")
        name = name.strip()
        if not sep or not name:
            raise Refused(f"{where}: the line {row.strip()!r} is not 'participant: value'")
        if name not in participants:
            raise Refused(f"{where}: {name!r} is not a participant of this master (they are "
                          f"{', '.join(participants)})")
        if name in found:
            raise Refused(f"{where}: {name} has two lines")
        if value.strip():  # 'worker1:' with nothing after it: the default
            found[name] = value
    return found


def resolve(prompt: Prompt, spec: InputSpec, participants: list[str], master: str) -> Prompt:
    """The prompt with each Distributed Value's table in its field and the master's own value as
    its items: every value parsed for the inputs the node feeds. Raises Refused."""
    result = prompt
    for nid in nodes_of(prompt, VALUE):
        fed = targets(prompt, nid)
        if not fed:
            continue
        where = describe(prompt, nid)
        kinds = []
        for tid, name in fed:
            found = spec(str(prompt[tid].get("class_type")), name)
            kind = _kind(found) if found is not None else None
            if kind is None:
                raise Refused(f"{where} feeds {describe(prompt, tid)}'s input {name!r}, which takes no number, text, "
                              f"true/false or choice: connect it to such an input (a widget's input)")
            kinds.append(kind)
        if len({k[0] for k in kinds}) > 1:
            raise Refused(f"{where} feeds inputs of different types ({', '.join(sorted({k[0] for k in kinds}))}): "
                          "use one Distributed Value for each")
        kind, options, choices = kinds[0]
        inputs = prompt[nid].get("inputs") or {}
        as_kind = "STRING" if kind == "COMBO" else kind
        default = parse(str(inputs.get("default", "")), as_kind, options, f"{where}, default")
        table = {p: parse(v, as_kind, options, f"{where}, {p}")
                 for p, v in lines(inputs.get("values", ""), participants, where).items()}
        mine = table.get(master, default)
        if choices is not None and mine not in choices:  # the others are checked on each worker
            raise Refused(f"{where}: the master's value {mine!r} is not one of {describe(prompt, fed[0][0])}'s "
                          f"choices for {fed[0][1]!r} on the master")
        node = copy.deepcopy(prompt[nid])
        node["inputs"][FIELD] = json.dumps({"kind": kind, "default": default, "values": table, "items": [mine]},
                                           separators=(",", ":"))
        result = {**result, nid: node}
    return result


def with_items(prompt: Prompt, owners: list[str]) -> Prompt:
    """The prompt with each resolved Distributed Value handing on one item per unit rendered: the
    value of ``owners[i]`` for the i-th unit."""
    result = prompt
    for nid in nodes_of(prompt, VALUE):
        field = read_field(prompt, nid)
        if not field or "values" not in field:
            continue
        items = [field["values"].get(owner, field.get("default")) for owner in owners]
        node = copy.deepcopy(prompt[nid])
        node["inputs"][FIELD] = json.dumps({**field, "items": items}, separators=(",", ":"))
        result = {**result, nid: node}
    return result


def labels(prompt: Prompt, owners: list[str]) -> list[str]:
    """What the panel shows beside a share: each Distributed Value's title and the values that the
    share's items take (``owners`` as for with_items)."""
    shown = []
    for nid in nodes_of(prompt, VALUE):
        field = read_field(prompt, nid)
        if field and "values" in field:
            meta = prompt[nid].get("_meta")
            title = (meta.get("title") if isinstance(meta, dict) else None) or "Distributed Value"
            taken = list(dict.fromkeys(_shown(field["values"].get(o, field.get("default"))) for o in owners))
            shown.append(f"{title}: {', '.join(taken)}")
    return shown


def _shown(value: Any) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


def titled(prompt: Prompt, graph: Any) -> Prompt:
    """The prompt with each Distributed Value's title from the browser's workflow (``graph``, the
    extra_pnginfo workflow) where the prompt carries none (frontends before mid-2024 send no _meta)."""
    titles = {str(n.get("id")): n.get("title") for n in (graph or {}).get("nodes") or []
              if isinstance(n, dict) and isinstance(n.get("title"), str)} if isinstance(graph, dict) else {}
    result = prompt
    for nid in nodes_of(prompt, VALUE):
        meta = prompt[nid].get("_meta")
        if titles.get(nid) and not (isinstance(meta, dict) and meta.get("title")):
            result = {**result, nid: {**prompt[nid], "_meta": {**(meta if isinstance(meta, dict) else {}),
                                                               "title": titles[nid]}}}
    return result


def lacking(prompt: Prompt, choices_of: Callable[[str, str], list | None]) -> list[tuple[str, str, str, Any]]:
    """(value node, target node, input, value) for each item a Distributed Value hands to a choice
    input that the instance whose choices ``choices_of(class_type, input)`` gives does not offer (a
    checkpoint or LoRA a worker lacks)."""
    missing = []
    for nid in nodes_of(prompt, VALUE):
        field = read_field(prompt, nid)
        if not field or field.get("kind") != "COMBO":
            continue
        for tid, name in targets(prompt, nid):
            offered = choices_of(str(prompt[tid].get("class_type")), name)
            if offered is None:
                continue
            for item in field.get("items") or []:
                if item not in offered:
                    missing.append((nid, tid, name, item))
    return missing
