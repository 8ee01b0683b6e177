"""Distributed Value on real servers: a master and two workers, each rendering its own value into the
colour of its image, in slot order; a participant disabled; a value that does not fit refused when
queued; a checkpoint one worker lacks; the spread queue."""
from __future__ import annotations

import json

import pytest

from harness import blue_values, error_of, image_workflow, wait_until
from test_e2e_doctor import CHECKPOINT, master_with_model  # noqa: F401 - a fixture
from test_e2e_spread import finished, saved

pytestmark = pytest.mark.timeout(300)


def value_workflow(lines: str, default: str = "5", batch: int = 1) -> dict:
    """The colour of each participant's image comes from its Distributed Value (blue = the value)."""
    prompt = image_workflow(seed=0, batch=batch)
    prompt["9"] = {"class_type": "DistributedValue", "inputs": {"default": default, "values": lines},
                   "_meta": {"title": "Colour"}}
    prompt["2"]["inputs"]["color"] = ["9", 0]
    return prompt


def last_job(master) -> dict:
    return wait_until(lambda: (master.get("/distributed/status").json()["recent"] or [None])[0], 30,
                      what="the job in the recent list")


def test_three_participants_render_three_values_in_slot_order(live):
    live.reset_config()
    entry = live.master.wait_prompt(live.master.queue_prompt(value_workflow("master: 10\nworker1: 20\nworker2: 30")), 120)
    assert error_of(entry) == ""
    assert blue_values(live.master.saved_images(entry, "5")) == [10, 20, 30]
    shares = {s["participant"]: s["values"] for s in last_job(live.master)["shares"]}
    assert shares == {"master": ["Colour: 10"], "worker1": ["Colour: 20"], "worker2": ["Colour: 30"]}
    for worker, value in zip(live.workers, (20, 30)):  # each worker was sent its own value only
        sent = [item["prompt"][2] for item in worker.get("/history").json().values()]
        fields = [json.loads(p["9"]["inputs"]["_distributed"]) for p in sent if "9" in p]
        assert fields and fields[-1]["items"] == [value], fields


def test_a_disabled_participant_leaves_the_others_their_values(live):
    config = live.default_config()
    config["workers"][0]["enabled"] = False
    live.reset_config(config)
    try:
        entry = live.master.wait_prompt(
            live.master.queue_prompt(value_workflow("worker1: 20\nworker2: 30", default="7")), 120)
    finally:
        live.reset_config()
    assert error_of(entry) == ""
    assert blue_values(live.master.saved_images(entry, "5")) == [7, 30]  # the master's default, worker2's own


def test_a_slot_rescued_by_another_participant_keeps_its_value(live):
    """worker1 stops answering: another participant renders its slot, and that image still has
    worker1's value, in worker1's place in the batch."""
    import signal
    config = live.default_config(job_timeout=4)
    live.reset_config(config)
    live.workers[0].signal(signal.SIGSTOP)
    try:
        entry = live.master.wait_prompt(
            live.master.queue_prompt(value_workflow("master: 10\nworker1: 20\nworker2: 30")), 120)
    finally:
        live.workers[0].signal(signal.SIGCONT)
        live.reset_config()
    assert error_of(entry) == ""
    assert blue_values(live.master.saved_images(entry, "5")) == [10, 20, 30]
    # worker1's slot went to another participant, at planning (seen down) or by failing over
    holders = [s for s in last_job(live.master)["shares"] if 1 in s["units"] and s["participant"] != "worker1"]
    assert holders and all("20" in " ".join(s["values"]) for s in holders), holders


@pytest.mark.parametrize("lines, words", [
    ("worker1: blue", "'blue' is not a whole number"),
    ("worker7: 3", "'worker7' is not a participant of this master"),
    ("worker2: 99999999999", "outside 0 to 16777215"),
])
def test_a_value_that_does_not_fit_is_refused_when_queued(live, lines, words):
    live.reset_config()
    resp = live.master.post("/prompt", {"prompt": value_workflow(lines), "client_id": "tests"})
    assert resp.status_code == 400, resp.text
    message = resp.json()["error"]["message"]
    assert "Colour (node 9)" in message and words in message, message
    assert all(instance.idle() for instance in live.instances)


def test_a_checkpoint_that_one_worker_lacks_leaves_it_out_with_the_reason(master_with_model):  # noqa: F811
    master = master_with_model
    prompt = value_workflow("master: 10\nlacks: 20\nhas: 30")
    prompt["8"] = {"class_type": "DistributedValue", "inputs": {"default": CHECKPOINT, "values": ""},
                   "_meta": {"title": "Checkpoint"}}
    prompt["3b"] = {"class_type": "DistributedTestNeedsCheckpoint", "inputs": {"images": ["3", 0],
                                                                             "ckpt_name": ["8", 0]}}
    prompt["4"]["inputs"]["images"] = ["3b", 0]
    # jobs plan with what the master's checks last saw: both workers up (the fixture just started one)
    wait_until(lambda: all(r["state"] in ("online", "busy") for r in master.get("/distributed/status").json()["instances"]
                           if r["enabled"]), 60, interval=0.3, what="the master to see both workers online")
    entry = master.wait_prompt(master.queue_prompt(prompt), 120)
    assert error_of(entry) == ""
    assert blue_values(master.saved_images(entry, "5")) == [10, 20, 30]  # its slot rendered by another
    assert f"lacks-model failed: it lacks what this workflow needs: models/checkpoints/{CHECKPOINT}" \
        in master.log_tail(400)


def test_a_spread_prompt_renders_with_the_value_of_whoever_renders_it(live):
    live.reset_config(live.default_config(spread_queue=True))
    prompts = []
    for k in range(6):
        prompt = {"9": {"class_type": "DistributedValue",
                        "inputs": {"default": "1", "values": "master: 11\nworker1: 22\nworker2: 33"}},
                  "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                               "color": ["9", 0]}},
                  "2": {"class_type": "DistributedTestProbe", "inputs": {"images": ["1", 0], "seconds_per_image": 0.6,
                                                                         "label": f"valued{k}"}},
                  "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": f"valued{k}"}}}
        prompts.append(prompt)
    try:
        ids = [live.master.queue_prompt(p) for p in prompts]
        entries = finished(live.master, ids)
        recent = {r["prompt_id"]: r for r in live.master.get("/distributed/spread").json()["recent"]}
    finally:
        live.reset_config()
    names = {i.port: i.name for i in live.instances}
    who = {p["label"]: names[p["port"]] for p in live.probes() if p["label"].startswith("valued")}
    expected = {"master": 11, "worker1": 22, "worker2": 33}
    import numpy as np
    for k, entry in enumerate(entries):
        assert error_of(entry) == ""
        [image] = saved(live.master, entry)
        assert int(np.asarray(image.convert("RGB"))[0, 0, 2]) == expected[who[f"valued{k}"]], (k, who)
    assert {"worker1", "worker2"} & set(who.values()), who
    shown = {pid: recent[pid]["values"] for pid in ids if pid in recent}  # what the panel's spread section shows
    assert shown and all(v == [f"Distributed Value: {expected[recent[pid]['participant']]}"]
                         for pid, v in shown.items()), recent


# --- each image's own workflow (provenance.py) -----------------------------------------------------

def browser_graph(prompt: dict) -> dict:
    """The browser's workflow for the nodes whose widgets change per image, as the frontend saves it."""
    nodes = []
    for nid, node in prompt.items():
        inputs = node["inputs"]
        if node["class_type"] == "DistributedSeed":
            nodes.append({"id": int(nid), "type": "DistributedSeed", "widgets_values": [inputs["seed"], "fixed", 1]})
        elif node["class_type"] == "DistributedValue":
            nodes.append({"id": int(nid), "type": "DistributedValue",
                          "widgets_values": [inputs["default"], inputs["values"]]})
    return {"nodes": nodes, "links": [], "version": 0.4}


def saved_infos(master, entry: dict, node: str) -> list[dict]:
    from PIL import Image
    return [Image.open(master.dirs["output"] / item.get("subfolder", "") / item["filename"]).info
            for item in entry["outputs"][node]["images"]]


@pytest.mark.parametrize("case", ["seed", "value"])
def test_each_image_embeds_the_workflow_that_makes_it_again_and_names_its_participant(live, case):
    """Three participants' images, each saved on the master: the prompt and workflow in a worker's
    file, queued again, give that image on the master's own slot (the first of the new batch)."""
    import numpy as np
    live.reset_config()
    if case == "seed":  # the colour comes from each slot's seed
        prompt = image_workflow(seed=40, batch=1)
        prompt["9"] = {"class_type": "DistributedValue", "inputs": {"default": "x", "values": "worker2: y"}}
        prompt["3"]["inputs"]["label"] = ["9", 0]
    else:  # the colour comes from each participant's value
        prompt = value_workflow("master: 10\nworker1: 20\nworker2: 30")
    graph = browser_graph(prompt)
    resp = live.master.post("/prompt", {"prompt": prompt, "client_id": "tests",
                                        "extra_data": {"extra_pnginfo": {"workflow": graph}}})
    assert resp.status_code == 200, resp.text
    entry = live.master.wait_prompt(resp.json()["prompt_id"], 120)
    assert error_of(entry) == ""
    images = live.master.saved_images(entry, "5")
    infos = saved_infos(live.master, entry, "5")
    assert blue_values(images) == ([40, 41, 42] if case == "seed" else [10, 20, 30])
    tags = [json.loads(info["distributed"]) for info in infos]
    assert [t["participant"] for t in tags] == ["master", "worker1", "worker2"]
    assert [t["rendered_by"] for t in tags] == ["master", "worker1", "worker2"]
    for k, (image, info) in enumerate(zip(images, infos)):
        embedded, workflow = json.loads(info["prompt"]), json.loads(info["workflow"])
        again = live.master.post("/prompt", {"prompt": embedded, "client_id": "tests",
                                             "extra_data": {"extra_pnginfo": {"workflow": workflow}}})
        assert again.status_code == 200, again.text
        redone = live.master.wait_prompt(again.json()["prompt_id"], 120)
        assert error_of(redone) == ""
        first = live.master.saved_images(redone, "5")[0]
        assert np.array_equal(first, image), (k, blue_values([first]), blue_values([image]))
        seeds = {n["id"]: n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "DistributedSeed"}
        assert seeds == {1: (40 if case == "seed" else 0) + k}  # the browser's workflow holds the image's seed
        if case == "seed":
            assert embedded["9"]["inputs"]["values"] == {0: "worker2: y", 1: "worker2: y", 2: "master: y\nworker2: y"}[k]
