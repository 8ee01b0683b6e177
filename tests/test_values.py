"""Distributed Value (distributed_core/values.py): parsing, the refusals, whose value each unit takes,
and what the doctor sees of it, on plain values. tests/test_e2e_values.py runs it on real servers."""
from __future__ import annotations

import json

import pytest

from distributed_core import doctor, values
from distributed_core.collector_jobs import value_owners
from distributed_core.config import parse as parse_config
from distributed_core.jobs import Job
from distributed_core.workflow import FIELD, read_field

PARTICIPANTS = ["master", "worker1", "worker2"]
SPECS = {("KSampler", "cfg"): ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0}),
         ("KSampler", "steps"): ("INT", {"default": 20, "min": 1, "max": 10000}),
         ("KSampler", "sampler_name"): (["euler", "dpmpp_2m"], {}),
         ("KSampler", "model"): ("MODEL",),
         ("CLIPTextEncode", "text"): ("STRING", {"multiline": True}),
         ("V3Node", "mode"): ("COMBO", {"options": ["a", "b"]}),
         ("Toggle", "on"): ("BOOLEAN", {"default": True})}


def spec(class_type: str, name: str):
    return SPECS.get((class_type, name))


def prompt_with(target: tuple[str, str], default: str, lines: str, title: str = "") -> dict:
    node = {"class_type": "DistributedValue", "inputs": {"default": default, "values": lines}}
    if title:
        node["_meta"] = {"title": title}
    return {"7": node, "3": {"class_type": target[0], "inputs": {target[1]: ["7", 0]}}}


def table(prompt: dict) -> dict:
    return read_field(prompt, "7")


def test_each_participant_gets_its_value_typed_for_the_input():
    resolved = values.resolve(prompt_with(("KSampler", "cfg"), "7", "worker1: 5.5\n# a comment\n\nworker2:  9"),
                              spec, PARTICIPANTS, "master")
    field = table(resolved)
    assert field["kind"] == "FLOAT" and field["default"] == 7.0 and field["values"] == {"worker1": 5.5, "worker2": 9.0}
    assert field["items"] == [7.0]  # the master's own, until a job says more
    assert values.with_items(resolved, ["worker2", "master", "worker1"])["7"]["inputs"][FIELD] \
        == json.dumps({**field, "items": [9.0, 7.0, 5.5]}, separators=(",", ":"))
    steps = table(values.resolve(prompt_with(("KSampler", "steps"), "20", "master: 4"), spec, PARTICIPANTS, "master"))
    assert steps["items"] == [4] and isinstance(steps["items"][0], int)
    toggle = table(values.resolve(prompt_with(("Toggle", "on"), "true", "worker1: off"), spec, PARTICIPANTS, "master"))
    assert toggle["default"] is True and toggle["values"] == {"worker1": False}


def test_choices_text_and_v3_combos():
    resolved = values.resolve(prompt_with(("KSampler", "sampler_name"), "euler", "worker1: anything_else"),
                              spec, PARTICIPANTS, "master")
    assert table(resolved)["kind"] == "COMBO"  # a worker's choices are checked on that worker
    with pytest.raises(values.Refused, match="not one of KSampler .node 3.'s choices"):
        values.resolve(prompt_with(("KSampler", "sampler_name"), "euler", "master: nope"), spec, PARTICIPANTS,
                       "master")
    assert table(values.resolve(prompt_with(("V3Node", "mode"), "b", ""), spec, PARTICIPANTS, "master"))["items"] == ["b"]
    text = table(values.resolve(prompt_with(("CLIPTextEncode", "text"), "a cat", "worker2: a dog: in a hat"),
                                spec, PARTICIPANTS, "master"))
    assert text["values"] == {"worker2": "a dog: in a hat"}  # only the first colon separates


@pytest.mark.parametrize("target, default, lines, words", [
    (("KSampler", "cfg"), "7", "worker1: abc", "'abc' is not a number"),
    (("KSampler", "steps"), "20", "worker2: 2.5", "'2.5' is not a whole number"),
    (("KSampler", "cfg"), "7", "worker1: 500", "outside 0.0 to 100.0"),
    (("KSampler", "cfg"), "7", "worker9: 5", "'worker9' is not a participant of this master"),
    (("KSampler", "cfg"), "7", "worker1 5", "is not 'participant: value'"),
    (("KSampler", "cfg"), "7", "worker1: 5\nworker1: 6", "worker1 has two lines"),
    (("KSampler", "cfg"), "seven", "", "default: 'seven' is not a number"),
    (("KSampler", "model"), "x", "", "takes no number, text"),
    (("Unknown", "x"), "1", "", "takes no number, text"),
    (("KSampler", "cfg"), "inf", "", "not a number"),
])
def test_what_does_not_fit_is_refused_with_the_node_and_line_named(target, default, lines, words):
    with pytest.raises(values.Refused, match=words.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        values.resolve(prompt_with(target, default, lines, title="CFG per GPU"), spec, PARTICIPANTS, "master")


def test_a_value_feeding_inputs_of_two_types_is_refused_and_one_feeding_nothing_is_left_alone():
    prompt = prompt_with(("KSampler", "cfg"), "7", "")
    prompt["4"] = {"class_type": "CLIPTextEncode", "inputs": {"text": ["7", 0]}}
    with pytest.raises(values.Refused, match="inputs of different types"):
        values.resolve(prompt, spec, PARTICIPANTS, "master")
    alone = {"7": {"class_type": "DistributedValue", "inputs": {"default": "x", "values": "nobody: 1"}}}
    assert values.resolve(alone, spec, PARTICIPANTS, "master") == alone


def test_a_unit_takes_the_value_of_its_seed_slot_whoever_renders_it():
    config = parse_config({"workers": [{"id": "worker1", "port": 8189}, {"id": "worker2", "port": 8190},
                                       {"id": "worker3", "port": 8191, "enabled": False}]})
    multiply = Job(id="j", collectors=["4"], units=[0, 1, 2])
    assert value_owners(multiply, [0], "master", config) == ["master"]
    assert value_owners(multiply, [2, 1], "worker2", config) == ["worker2", "worker1"]  # worker1's slot, rescued
    split = Job(id="s", collectors=["4"], units=list(range(10)), split=True)
    assert value_owners(split, [3, 4, 5, 8, 9], "worker1", config) == ["worker1", "worker1"]  # one per chunk


def test_the_panel_label_and_what_a_worker_lacks():
    resolved = values.resolve(prompt_with(("KSampler", "sampler_name"), "euler", "worker1: dpmpp_2m",
                                          title="Sampler"), spec, PARTICIPANTS, "master")
    assert values.labels(resolved, ["worker1"]) == ["Sampler: dpmpp_2m"]
    assert values.labels(resolved, ["master", "worker1"]) == ["Sampler: euler, dpmpp_2m"]
    sent = values.with_items(resolved, ["worker1"])
    info = {"KSampler": {"input": {"required": {"sampler_name": [["euler"], {}]}}},
            "DistributedValue": {"input": {"required": {}}}}
    lacking = doctor.lacking(sent, info)
    assert [(m["kind"], m["name"], m["node"], m["input"]) for m in lacking] == \
        [("choice", "dpmpp_2m", "3", "sampler_name")]
    checkpoint = values.with_items(values.resolve(
        {"7": {"class_type": "DistributedValue", "inputs": {"default": "a.safetensors", "values": ""}},
         "3": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ["7", 0]}}},
        lambda c, n: (["a.safetensors"], {}), PARTICIPANTS, "master"), ["worker1"])
    info = {"CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["b.safetensors"], {}]}}},
            "DistributedValue": {"input": {"required": {}}}}
    assert [(m["kind"], m["folder"]) for m in doctor.blocking(checkpoint, info)] == [("model", "checkpoints")]


def test_a_title_comes_from_the_browsers_workflow_where_the_prompt_has_none_and_numbers_read_plainly():
    prompt = prompt_with(("KSampler", "cfg"), "7", "worker1: 5.5")
    graph = {"nodes": [{"id": 7, "title": "CFG per GPU"}, {"id": 3, "title": "Sampler"}]}
    resolved = values.resolve(values.titled(prompt, graph), spec, PARTICIPANTS, "master")
    assert values.labels(resolved, ["master", "worker1"]) == ["CFG per GPU: 7, 5.5"]
    assert values.titled(prompt_with(("KSampler", "cfg"), "7", "", title="Mine"), graph)["7"]["_meta"] == {"title": "Mine"}
    assert values.titled(prompt, None) == prompt
