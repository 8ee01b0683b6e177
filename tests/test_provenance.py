"""Each image of a Collector's batch with its own workflow (distributed_core/provenance.py), on plain
values: who each unit belongs to and who rendered it, and the prompt and browser workflow that make
that image on the master's own slot."""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from distributed_core import provenance  # noqa: E402
from distributed_core.jobs import Job, Share  # noqa: E402
from distributed_core.provenance import Origin  # noqa: E402

PROMPT = {
    "1": {"class_type": "DistributedSeed", "inputs": {"seed": 40, "step": 10}},
    "9": {"class_type": "DistributedValue", "inputs": {"default": "5", "values": "master: 10\nworker1: 20\n# a note"}},
    "4": {"class_type": "MultiGPUCollector", "inputs": {"images": ["3", 0]}},
}
GRAPH = {"nodes": [{"id": 1, "type": "DistributedSeed", "widgets_values": [40, "fixed", 10]},
                   {"id": 9, "type": "DistributedValue", "widgets_values": ["5", "master: 10\nworker1: 20\n# a note"]},
                   {"id": 4, "type": "MultiGPUCollector", "widgets_values": []}],
         "links": [], "version": 0.4}


def multiply_job() -> Job:
    job = Job(id="j1", collectors=["4"], units=[0, 1, 2])
    job.shares = {"master": Share("master", "master", [0], state="done"),
                  "worker1": Share("worker1", "worker1", [1], state="failed"),
                  "worker2": Share("worker2", "worker2", [2], state="done"),
                  "worker2#3": Share("worker2", "worker2 (for worker1)", [1], state="done")}
    return job


def test_each_unit_names_its_slot_and_who_rendered_it_after_a_rescue():
    found = provenance.origins(multiply_job(), {0: "master", 1: "worker1", 2: "worker2"})
    assert [(o.unit, o.participant, o.rendered_by) for o in found] == [
        (0, "master", "master"), (1, "worker1", "worker2 (for worker1)"), (2, "worker2", "worker2")]
    made = provenance.Provenance({}, found)
    assert provenance.per_image(made, 6).origins == [found[0], found[0], found[1], found[1], found[2], found[2]]
    assert provenance.per_image(made, 5) is None  # images that do not divide evenly get no origins
    assert provenance.per_image(None, 3) is None and provenance.per_image(provenance.Provenance({}, []), 0) is None


def test_the_prompt_as_queued_has_none_of_the_masters_fields_or_cache_marks():
    run = {"1": {"class_type": "DistributedSeed", "inputs": {"seed": 4, "_distributed": '{"units":[0]}'},
                 "is_changed": [float("nan")]}, "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}}
    assert provenance.queued(run) == {"1": {"class_type": "DistributedSeed", "inputs": {"seed": 4}},
                                      "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}}
    assert "_distributed" in run["1"]["inputs"]  # the master's own prompt is left as it is


def test_in_split_mode_each_batch_index_names_its_renderer():
    job = Job(id="s", collectors=["4"], units=list(range(4)), split=True)
    job.shares = {"master": Share("master", "master", [0, 1], state="done"),
                  "worker1": Share("worker1", "worker1", [2, 3], state="done")}
    found = provenance.origins(job, {})
    assert [(o.unit, o.participant, o.split) for o in found] == [
        (0, "master", True), (1, "master", True), (2, "worker1", True), (3, "worker1", True)]


def texts_for(origin: Origin) -> tuple[dict, dict, dict]:
    found = provenance.texts(PROMPT, {"workflow": GRAPH, "other": {"k": 1}}, origin)
    return json.loads(found["prompt"]), json.loads(found["workflow"]), json.loads(found["distributed"])


def test_a_workers_image_embeds_its_seed_and_value_on_the_masters_slot():
    prompt, graph, tag = texts_for(Origin(1, "worker1", "worker2 (for worker1)", False, "j1"))
    assert prompt["1"]["inputs"] == {"seed": 50, "step": 10}  # seed + slot x step: what worker1's slot drew
    assert prompt["9"]["inputs"]["values"].splitlines()[0] == "master: 20"  # the master now renders worker1's value
    assert "master: 10" not in prompt["9"]["inputs"]["values"] and "worker1: 20" in prompt["9"]["inputs"]["values"]
    nodes = {n["id"]: n for n in graph["nodes"]}
    assert nodes[1]["widgets_values"] == [50, "fixed", 10]
    assert nodes[9]["widgets_values"] == ["5", prompt["9"]["inputs"]["values"]]
    assert tag == {"participant": "worker1", "rendered_by": "worker2 (for worker1)", "unit": 1,
                   "mode": "multiply", "job": "j1", "seed": 50}
    assert PROMPT["1"]["inputs"]["seed"] == 40 and GRAPH["nodes"][0]["widgets_values"][0] == 40  # not changed


def test_the_masters_image_embeds_the_workflow_as_queued():
    prompt, graph, tag = texts_for(Origin(0, "master", "master", False, "j1"))
    assert prompt == PROMPT and graph == GRAPH
    assert tag["participant"] == "master" and tag["seed"] == 40


def test_a_participant_on_the_default_takes_the_masters_line_out():
    prompt, _graph, _tag = texts_for(Origin(2, "worker2", "worker2", False, "j1"))
    assert prompt["9"]["inputs"]["values"] == "worker1: 20\n# a note"  # the master takes the default, as worker2 did
    assert prompt["1"]["inputs"]["seed"] == 60


def test_in_split_mode_the_batch_is_queued_as_it_was_with_the_renderers_value_for_all():
    prompt, graph, tag = texts_for(Origin(3, "worker1", "worker1", True, "s"))
    assert prompt["1"] == PROMPT["1"]  # split mode: the seeds make the whole batch as one GPU would
    assert prompt["9"]["inputs"] == {"default": "20", "values": ""}
    assert {n["id"]: n for n in graph["nodes"]}[9]["widgets_values"] == ["20", ""]
    assert tag["mode"] == "split" and tag["unit"] == 3


def test_a_seed_from_a_link_or_an_unknown_graph_is_left_as_it_is():
    linked = {**PROMPT, "1": {"class_type": "DistributedSeed", "inputs": {"seed": ["7", 0]}}}
    found = provenance.texts(linked, {"workflow": {"nodes": "odd"}}, Origin(1, "worker1", "worker1", False, "j"))
    assert json.loads(found["prompt"])["1"] == linked["1"]
    assert json.loads(found["workflow"]) == {"nodes": "odd"}
    assert "seed" not in json.loads(found["distributed"])
    renamed = {"nodes": [{"id": 1, "type": "KSampler", "widgets_values": [40]}]}  # another node with that id
    found = provenance.texts(PROMPT, {"workflow": renamed}, Origin(1, "worker1", "worker1", False, "j"))
    assert json.loads(found["workflow"]) == renamed


def test_only_a_batch_that_a_collector_gathered_carries_origins():
    class Batch(list):
        pass

    batch = Batch([0, 0])
    assert provenance.batch_texts(batch, PROMPT, None) is None
    setattr(batch, provenance.ATTRIBUTE, provenance.Provenance(PROMPT, [Origin(0, "master", "master", False, "j"),
                                                                       Origin(1, "worker1", "worker1", False, "j")]))
    found = provenance.batch_texts(batch, {"run": "prompt"}, None)  # the batch's queued prompt, not the run one
    assert [json.loads(t["distributed"])["participant"] for t in found] == ["master", "worker1"]
    assert json.loads(found[0]["prompt"]) == PROMPT
    assert set(found[0]) == {"prompt", "distributed"}  # no extra_pnginfo: no workflow entry
    assert provenance.batch_texts(batch[:1], PROMPT, None) is None  # a slice is another batch
