"""Unit tests of the core logic on plain values (no ComfyUI)."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from distributed_core import config, plan, wire, workflow
from distributed_core.jobs import Job, JobFailed, JobState, JobStore, Share
from distributed_core.vault import Refused, Vault

PRODUCT_SHEET_CONFIG = {
    "master": {"port": 8188, "device": 0, "enabled": True},
    "workers": [
        {"port": 8189, "device": 1, "enabled": True, "extra_args": "--enable-cors-header"},
        {"port": 8190, "device": 2, "enabled": True, "extra_args": "--enable-cors-header"},
    ],
    "settings": {"stagger_delay": 2.0, "job_timeout": 120},
}


# --- config ---------------------------------------------------------------------------------------

def test_product_sheet_config_is_honoured_as_it_is():
    c = config.parse(PRODUCT_SHEET_CONFIG)
    assert [w.port for w in c.workers] == [8189, 8190]
    assert [w.id for w in c.workers] == ["worker1", "worker2"]
    assert c.workers[0].host == "127.0.0.1" and c.workers[0].url == "http://127.0.0.1:8189"
    assert c.settings.mode == "parallel" and c.settings.job_timeout == 120


def test_shipped_defaults_file_is_valid():
    c = config.parse(json.loads(config.DEFAULTS_FILE.read_text()))
    assert c.master.port == 8188


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["workers"][1].__setitem__("port", 70000), "workers[1].port"),
    (lambda d: d["workers"][0].__setitem__("enabled", "yes"), "workers[0].enabled"),
    (lambda d: d["settings"].__setitem__("mode", "fast"), "settings.mode"),
    (lambda d: d["settings"].__setitem__("stagger_delay", -1), "settings.stagger_delay"),
    (lambda d: d["master"].__setitem__("port", "8188"), "master.port"),
    (lambda d: d["workers"][0].__setitem__("extra_args", "--cpu; rm -rf /"), "workers[0].extra_args"),
    (lambda d: d["workers"][0].__setitem__("host", "a b"), "workers[0].host"),
    (lambda d: d["workers"][0].__setitem__("prot", 1), "workers[0].prot"),
    (lambda d: d["workers"][1].__setitem__("port", 8189), "workers[1].port"),
    (lambda d: d.__setitem__("workers", {}), "workers"),
])
def test_validation_names_the_field(mutate, field):
    data = json.loads(json.dumps(PRODUCT_SHEET_CONFIG))
    mutate(data)
    with pytest.raises(config.ConfigError) as info:
        config.parse(data)
    assert any(e.startswith(field) for e in info.value.errors), info.value.errors


def test_round_trip_keeps_everything():
    c = config.parse(PRODUCT_SHEET_CONFIG)
    assert config.parse(c.to_dict()) == c


def test_broken_file_gives_defaults_and_keeps_the_file(tmp_path):
    path = tmp_path / "gpu_config.json"
    path.write_text('{"master": {"port": 8188,,}')
    loaded = config.load(path)
    assert "not valid JSON" in loaded.error and "line 1" in loaded.error
    assert loaded.config == config.parse(config.DEFAULT_CONFIG)
    assert path.read_text() == '{"master": {"port": 8188,,}'


def test_invalid_file_names_the_field(tmp_path):
    path = tmp_path / "gpu_config.json"
    path.write_text(json.dumps({"master": {"port": 0}}))
    assert "master.port" in config.load(path).error


def test_save_is_atomic_and_moves_a_broken_file_aside(tmp_path):
    path = tmp_path / "gpu_config.json"
    path.write_text("not json")
    config.save(config.parse(PRODUCT_SHEET_CONFIG), path)
    assert config.load(path).error == ""
    assert [p.name for p in tmp_path.glob("gpu_config.json.broken-*")]
    assert not list(tmp_path.glob(".gpu_config.json.*.tmp"))


def test_a_file_nested_too_deeply_gives_defaults_and_can_be_saved_over(tmp_path):
    path = tmp_path / "gpu_config.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    loaded = config.load(path)
    assert "nested too deeply" in loaded.error and "save settings from the Distributed panel" in loaded.error
    assert loaded.config == config.parse(config.DEFAULT_CONFIG)
    config.save(config.parse(PRODUCT_SHEET_CONFIG), path)
    assert config.load(path).error == ""
    (aside,) = tmp_path.glob("gpu_config.json.broken-*")
    assert aside.read_text().startswith("[" * 1000)


def test_a_value_nested_too_deeply_is_named_not_quoted():
    value = 1
    for _ in range(100_000):
        value = [value]
    with pytest.raises(config.ConfigError) as info:
        config.parse({"master": {"port": value}, "settings": {"mode": value}})
    assert info.value.errors[0].startswith("master.port:") and "nested too deeply" in info.value.errors[0]
    assert any(e.startswith("settings.mode:") for e in info.value.errors)


def test_user_settings_live_outside_the_tracked_file(tmp_path, monkeypatch):
    monkeypatch.delenv(config.ENV_VAR, raising=False)
    assert config.save_path() == config.LOCAL_FILE
    assert config.LOCAL_FILE.name in (config.EXTENSION_DIR / ".gitignore").read_text()
    monkeypatch.setenv(config.ENV_VAR, str(tmp_path / "x.json"))
    assert config.config_path() == tmp_path / "x.json" == config.save_path()


# --- plan -----------------------------------------------------------------------------------------

def test_slots_follow_config_positions():
    c = config.parse(PRODUCT_SHEET_CONFIG)
    assert plan.slots(c) == [plan.Slot("master", 0), plan.Slot("worker1", 1), plan.Slot("worker2", 2)]
    c.workers[0].enabled = False
    assert plan.slots(c) == [plan.Slot("master", 0), plan.Slot("worker2", 2)]
    c.master.enabled = False
    c.workers[1].enabled = False
    with pytest.raises(plan.PlanError, match="Nothing to render on"):
        plan.slots(c)


def test_assign_spreads_orphans_evenly_and_deterministically():
    units = {"master": [0], "a": [1], "b": [2], "c": [3], "d": [4]}
    assert plan.assign(units, ["master", "a", "b", "c", "d"]) == units
    assert plan.assign(units, ["master", "a", "b"]) == {"master": [0, 3], "a": [1, 4], "b": [2]}
    assert plan.assign(units, ["b"]) == {"b": [0, 1, 2, 3, 4]}
    with pytest.raises(plan.PlanError):
        plan.assign(units, [])


def test_seed_offsets_wrap_like_comfyui_seeds():
    assert plan.seed_for(100, 0) == 100 and plan.seed_for(100, 2) == 102
    assert plan.seed_for(0xFFFFFFFFFFFFFFFF, 1) == 0


# --- workflow -------------------------------------------------------------------------------------

PROMPT = {
    "1": {"class_type": "DistributedSeed", "inputs": {"seed": 5}},
    "2": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": ["1", 0]}},
    "3": {"class_type": "MultiGPUCollector", "inputs": {"images": ["2", 0]}},
    "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}},
    "5": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
}


def test_worker_prompt_holds_only_the_upstream_part():
    wp = workflow.worker_prompt(PROMPT, ["3"], {"job": "j"}, [[1, 1], [3, 1]], [1, 3])
    assert set(wp) == {"1", "2", "3"}
    assert workflow.read_field(wp, "3") == {"job": "j", "role": "worker", "collector": "3",
                                            "chunks": [[1, 1], [3, 1]]}
    assert workflow.read_field(wp, "1") == {"units": [1, 3]}
    assert workflow.fresh_collectors(wp) == []  # a worker never distributes again
    assert workflow.FIELD not in PROMPT["3"]["inputs"]  # the original is untouched


def test_master_prompt_keeps_the_workflow_and_drops_the_input_when_it_renders_nothing():
    mp = workflow.master_prompt(PROMPT, ["3"], {"job": "j"}, [[0, 1]], [0])
    assert set(mp) == set(PROMPT) and mp["3"]["inputs"]["images"] == ["2", 0]
    assert workflow.read_field(mp, "1") == {"units": [0]}
    idle = workflow.master_prompt(PROMPT, ["3"], {"job": "j"}, [], [])
    source = idle["3"]["inputs"]["images"][0]
    assert idle[source]["class_type"] == "EmptyImage" and source not in PROMPT


CHAINED = {
    "1": {"class_type": "DistributedSeed", "inputs": {"seed": 5}},
    "2": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 2, "color": ["1", 0]}},
    "3": {"class_type": "MultiGPUCollector", "inputs": {"images": ["2", 0]}},
    "4": {"class_type": "ImageInvert", "inputs": {"image": ["3", 0]}},
    "5": {"class_type": "MultiGPUCollector", "inputs": {"images": ["4", 0]}},
    "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "x"}},
    "7": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
}


def test_a_collector_after_another_runs_once_on_the_master():
    shape = workflow.layout(CHAINED, ["3", "5"])
    assert shape.fanned == ["3"] and shape.chained == ["5"]
    assert shape.own == {"1", "2", "7"} and shape.gathered == {"3", "4", "5", "6"}
    wp = workflow.worker_prompt(CHAINED, ["3", "5"], {"job": "j"}, [[1, 1]], [1])
    assert set(wp) == {"1", "2", "3"}  # the second Collector never reaches a worker
    mp = workflow.master_prompt(CHAINED, ["3", "5"], {"job": "j"}, [[0, 1]], [0])
    assert workflow.read_field(mp, "3")["role"] == "master"
    assert workflow.read_field(mp, "5") == {"role": "pass"}
    assert workflow.read_field(mp, "1") == {"units": [0]} and "7" in mp


def test_parallel_collectors_are_both_fanned_out():
    prompt = {**CHAINED, "5": {"class_type": "MultiGPUCollector", "inputs": {"images": ["2", 0]}},
              "4": {"class_type": "ImageInvert", "inputs": {"image": ["5", 0]}},
              "6": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "x"}}}
    assert workflow.layout(prompt, ["3", "5"]).fanned == ["3", "5"]
    wp = workflow.worker_prompt(prompt, ["3", "5"], {"job": "j"}, [[1, 1]], [1])
    assert {workflow.read_field(wp, c)["role"] for c in ("3", "5")} == {"worker"}


def test_a_master_without_a_share_renders_no_share_at_all():
    mp = workflow.master_prompt(CHAINED, ["3", "5"], {"job": "j"}, [], [])
    assert not {"1", "2", "7"} & set(mp)  # no seed, no images, no preview of images nobody asked for
    assert mp[mp["3"]["inputs"]["images"][0]]["class_type"] == "EmptyImage"
    assert workflow.read_field(mp, "3")["chunks"] == [] and mp["5"]["inputs"]["images"] == ["4", 0]


def test_after_a_collector_a_seed_is_the_plain_seed():
    prompt = {**CHAINED, "4": {"class_type": "ImageScale", "inputs": {"image": ["3", 0], "width": ["1", 0],
                                                                        "height": 8, "upscale_method": "nearest-exact",
                                                                        "crop": "disabled"}}}
    mp = workflow.master_prompt(prompt, ["3", "5"], {"job": "j"}, [[0, 1], [2, 1]], [0, 2])
    clone = mp["4"]["inputs"]["width"][0]
    assert clone != "1" and workflow.read_field(mp, clone) is None  # seed as it is, once
    assert workflow.read_field(mp, "1") == {"units": [0, 2]} and prompt["4"]["inputs"]["width"] == ["1", 0]
    idle = workflow.master_prompt(prompt, ["3", "5"], {"job": "j"}, [], [])
    assert "1" not in idle and idle[idle["4"]["inputs"]["width"][0]]["class_type"] == "DistributedSeed"


def test_a_node_after_a_collector_cannot_take_a_share():
    prompt = {**CHAINED, "4": {"class_type": "ImageBatch", "inputs": {"image1": ["3", 0], "image2": ["2", 0]}}}
    with pytest.raises(workflow.WorkflowError) as info:
        workflow.layout(prompt, ["3", "5"])
    assert "ImageBatch (node 4)" in str(info.value) and "MultiGPUCollector (node 3)" in str(info.value)
    assert "EmptyImage (node 2)" in str(info.value)


def test_fields_from_a_client_are_dropped_and_a_dispatch_is_sealed():
    forged = {**PROMPT, "3": workflow._with_field(PROMPT["3"], {"job": "other", "role": "master", "chunks": []})}
    kind, stripped = workflow.screen(forged)
    assert kind == "stripped" and workflow.fresh_collectors(stripped) == ["3"]
    assert workflow.FIELD in forged["3"]["inputs"]  # the original is untouched
    assert workflow.screen(PROMPT) == ("new", PROMPT)
    wp = workflow.worker_prompt(PROMPT, ["3"], {"job": "j", "token": "secret"}, [[1, 1]], [1])
    assert workflow.screen(wp) == ("dispatch", wp)
    mixed = {**wp, "9": workflow._with_field(PROMPT["3"], {"job": "j", "role": "master"})}
    kind, message = workflow.screen(mixed)
    assert kind == "refused" and "MultiGPUCollector (node 9)" in message and "'master'" in message
    vault = Vault()
    minting = vault.collecting()
    sealed = vault.seal(wp)
    keys = vault.collected(minting)
    assert "secret" not in json.dumps(sealed) and "token" not in workflow.read_field(sealed, "3")
    key = workflow.read_field(sealed, "3")["sealed"]
    assert keys == [key]
    vault.bind(keys, "queued-id")
    assert vault.take(key, "queued-id") == "secret"
    with pytest.raises(Refused, match="used already"):
        vault.take(key, "queued-id")  # once


def test_a_sealed_key_serves_only_the_prompt_it_was_queued_in():
    vault = Vault()
    minting = vault.collecting()
    key = vault.keep("secret")
    vault.bind(vault.collected(minting), "genuine")
    with pytest.raises(Refused, match="copy of a prompt"):
        vault.take(key, "a-copy")  # whoever read the key from the queue and queued it again
    assert vault.take(key, "genuine") == "secret"  # the copy took nothing


def test_a_key_waits_for_its_prompt_id_and_a_prompt_that_was_not_queued_voids_it():
    import threading
    vault = Vault()
    minting = vault.collecting()
    key, void = vault.keep("secret"), vault.keep("other")
    keys = vault.collected(minting)
    threading.Timer(0.2, vault.bind, ([key], "genuine")).start()  # POST /prompt answers after the prompt started
    assert vault.take(key, "genuine", wait=10) == "secret"
    vault.discard([void])
    with pytest.raises(Refused, match="unknown"):
        vault.take(void, "genuine", wait=0)
    assert keys == [key, void]


def test_fresh_collectors_ignores_non_prompts():
    assert workflow.fresh_collectors(PROMPT) == ["3"]
    assert workflow.fresh_collectors(None) == [] and workflow.fresh_collectors([1]) == []
    with pytest.raises(workflow.WorkflowError):
        workflow.upstream({"3": {"class_type": "MultiGPUCollector", "inputs": {"images": ["9", 0]}}}, ["3"])
    assert workflow.read_field({"3": {"inputs": {workflow.FIELD: "not json"}}}, "3") is None


# --- wire -----------------------------------------------------------------------------------------

def _header(shape, dtype="float32", unit=1):
    return wire.Header("job", "3", unit, "tok", dtype, shape)


@pytest.mark.parametrize("shape, dtype", [((2, 3, 5, 3), "float32"), ((1, 4, 4, 3), "float32"),
                                          ((1, 7, 1, 4), "uint8"), ((3, 64, 33, 1), "float16"),
                                          ((8, 256, 256, 3), "float32")])
def test_frame_round_trip(shape, dtype):
    rng = np.random.default_rng(0)
    array = rng.random(shape).astype(wire.DTYPES[dtype]) if dtype != "uint8" else \
        rng.integers(0, 256, shape, dtype=np.uint8)
    frame = b"".join(bytes(p) for p in wire.encode(_header(shape, dtype), array))
    header, back = wire.decode(frame)
    assert header == _header(shape, dtype)
    assert back.dtype == array.dtype and back.shape == shape and np.array_equal(back, array)


def test_frames_that_are_wrong_are_refused():  # noqa: C901
    frame = b"".join(bytes(p) for p in wire.encode(_header((1, 2, 2, 3)), np.zeros((1, 2, 2, 3), np.float32)))
    with pytest.raises(wire.FrameError, match="payload"):
        wire.decode(frame[:-1])
    with pytest.raises(wire.FrameError, match="magic"):
        wire.decode(b"XXXX" + frame[4:])
    with pytest.raises(wire.FrameError, match="header length"):
        wire.header_length(wire.MAGIC + (10 ** 9).to_bytes(4, "big"))
    for bad in ({"job": "j"}, {**json.loads(_header((1, 2, 2, 3)).to_bytes()[8:]), "shape": [1, 2, 2, 9]},
                {**json.loads(_header((1, 2, 2, 3)).to_bytes()[8:]), "dtype": "float64"}):
        with pytest.raises(wire.FrameError):
            wire.parse_header(json.dumps(bad).encode())
    with pytest.raises(wire.FrameError):
        wire.encode(_header((1, 2, 2, 3)), np.zeros((1, 2, 2, 4), np.float32))


def test_quantize_rounds_to_nearest():
    assert wire.quantize(np.array([0.0, 0.5, 1.0, 1.2, -0.1, 0.499 / 255])).tolist() == [0, 128, 255, 255, 0, 0]


# --- jobs -----------------------------------------------------------------------------------------

def _job(units=(0, 1, 2), collectors=("3",)):
    return Job(id="j1", collectors=list(collectors), units=list(units))


def _token(job, *units, participant="worker1"):
    """Give a worker a share of these units; its token is good for them only."""
    share = Share(participant, participant, list(units))
    job.shares[f"{participant}#{len(job.shares)}"] = share
    return share.token


def test_results_are_checked_before_they_are_read():
    store = JobStore()
    job = _job()
    store.add(job)
    token = _token(job, 1)
    ok = wire.Header("j1", "3", 1, token, "uint8", (1, 2, 2, 3))
    assert store.reserve(ok) is not None  # it fits the final batch
    store.commit(ok, None)
    cases = [(wire.Header("nope", "3", 1, "t", "uint8", (1, 2, 2, 3)), 404),
             (wire.Header("j1", "3", 1, "bad", "uint8", (1, 2, 2, 3)), 403),
             (wire.Header("j1", "3", 9, token, "uint8", (1, 2, 2, 3)), 400),
             (wire.Header("j1", "3", 1, token, "uint8", (2, 2, 2, 3), 2), 400),  # count 2 in multiply
             (ok, 409)]
    for header, status in cases:
        with pytest.raises(wire.Rejected) as info:
            store.check(header)
        assert info.value.status == status
    store.end("j1", JobState.DONE)
    with pytest.raises(wire.Rejected) as info:
        store.check(ok)
    assert info.value.status == 410


def test_a_token_delivers_only_the_units_of_its_share():
    store = JobStore()
    job = Job(id="s", collectors=["3"], units=list(range(6)), split=True)
    store.add(job)
    first, second = _token(job, 0, 1, 2), _token(job, 3, 4, 5, participant="worker2")
    master = _token(job, 0, 1, 2, participant="master")
    for header, status in [(wire.Header("s", "3", 3, first, "uint8", (3, 1, 1, 1), 3), 400),  # not its units
                           (wire.Header("s", "3", 0, first, "uint8", (2, 1, 1, 1), 2), 400),  # part of its chunk
                           (wire.Header("s", "3", 0, first, "uint8", (3, 1, 1, 1), 3, ), None),
                           (wire.Header("s", "9", 0, first, "uint8", (3, 1, 1, 1), 3), 400),  # another collector
                           (wire.Header("s", "3", 0, master, "uint8", (3, 1, 1, 1), 3), 403),  # the master's own
                           (wire.Header("s", "3", 3, second, "uint8", (3, 1, 1, 1), 3), None)]:
        if status is None:
            store.check(header)
            continue
        with pytest.raises(wire.Rejected) as info:
            store.check(header)
        assert info.value.status == status, header


@pytest.mark.parametrize("key", ["job", "collector", "token"])
def test_a_header_string_with_a_lone_surrogate_is_refused(key):
    raw = json.loads(wire.Header("j", "3", 0, "t", "uint8", (1, 2, 2, 3)).to_bytes()[8:])
    with pytest.raises(wire.FrameError, match=f"header.{key} holds a lone surrogate"):
        wire.parse_header(json.dumps({**raw, key: "\ud800abc"}).encode())


def test_a_token_that_utf8_cannot_encode_is_a_wrong_token():
    store = JobStore()
    job = _job()
    store.add(job)
    _token(job, 1)
    for token in ("\ud800abc", "\udfff" * 40):
        with pytest.raises(wire.Rejected) as info:
            store.check(wire.Header("j1", "3", 1, token, "uint8", (1, 2, 2, 3)))
        assert info.value.status == 403
    assert not wire.same_token(None, "t") and wire.same_token("\ud800", "\ud800")


def test_a_frame_without_images_or_with_a_ragged_batch_is_refused():
    for shape, count in [((0, 2, 2, 3), 1), ((3, 2, 2, 3), 2)]:
        raw = json.loads(wire.Header("j", "3", 0, "t", "uint8", (1, 2, 2, 3)).to_bytes()[8:])
        with pytest.raises(wire.FrameError, match="images"):
            wire.parse_header(json.dumps({**raw, "shape": list(shape), "count": count}).encode())


def test_budget_holds_later_jobs_but_never_the_oldest():
    store = JobStore(budget_bytes=600)
    first, second, third = (Job(id="a", collectors=["3"], units=[1]), Job(id="b", collectors=["3"], units=[1, 2]),
                            Job(id="c", collectors=["3"], units=[1]))
    for job in (first, second, third):
        store.add(job)
    frame = lambda job: wire.Header(job.id, "3", 1, _token(job, 1), "float32", (1, 8, 8, 1))  # 256 bytes a unit
    store.reserve(frame(second))  # its final batch: 512 bytes
    with pytest.raises(wire.Rejected) as info:
        store.reserve(frame(third))
    assert info.value.status == 503
    store.reserve(frame(first))  # the oldest job is always let in
    assert store.held_bytes() == 768


def test_wait_wakes_on_results_and_raises_on_failure():
    store = JobStore()
    job = _job(units=(0, 1))
    store.add(job)
    store.put_local("j1", "3", 0, 1, np.zeros((1, 2, 2, 3), np.float32))
    assert store.wait("j1", "3", 0.01) == (1, False)
    frame = wire.frame("j1", "3", 1, 1, _token(job, 1), np.ones((1, 2, 2, 3), np.float32), "float32")
    threading.Timer(0.05, lambda: _send(store, frame)).start()
    started = time.monotonic()
    assert store.wait("j1", "3", 10) == (2, True)
    assert time.monotonic() - started < 5
    (batch,) = store.take("j1", "3")
    assert batch[:1].max() == 0 and batch[1:].min() == 1 and store.get("j1").all_taken()
    store.fail("j1", "worker1 failed: gone")
    with pytest.raises(JobFailed, match="worker1 failed"):
        store.wait("j1", "3", 1)


# --- the bundled example ----------------------------------------------------------------------------

def test_example_template_is_the_same_graph_as_the_example_prompt():
    from distributed_core import example
    template = json.loads(example.TEMPLATE.read_text())
    nodes = {str(n["id"]): n for n in template["nodes"]}
    assert {k: v["type"] for k, v in nodes.items()} == {k: v["class_type"] for k, v in example.PROMPT.items()}
    for _link, src, src_slot, dst, dst_slot, _type in template["links"]:
        name = nodes[str(dst)]["inputs"][dst_slot]["name"]
        assert example.PROMPT[str(dst)]["inputs"][name] == [str(src), src_slot]
    seed, _control, step = nodes["1"]["widgets_values"]
    assert example.PROMPT["1"]["inputs"] == {"seed": seed, "step": step}
    width, height, batch, _color = nodes["2"]["widgets_values"]
    assert {k: example.PROMPT["2"]["inputs"][k] for k in ("width", "height", "batch_size")} == \
        {"width": width, "height": height, "batch_size": batch}
    assert example.PROMPT["4"]["inputs"]["filename_prefix"] == nodes["4"]["widgets_values"][0]


def test_example_colours_differ_strongly_between_participants():
    import itertools

    from distributed_core import example, plan
    inputs = example.PROMPT["1"]["inputs"]
    colours = [[(plan.seed_for(inputs["seed"], k * inputs["step"]) >> shift) & 0xFF for shift in (16, 8, 0)]
               for k in range(8)]
    distance = min(sum((a - b) ** 2 for a, b in zip(x, y)) ** 0.5 for x, y in itertools.combinations(colours, 2))
    assert distance > 100, colours  # out of 441 between black and white; 1 before, invisible


# --- access ---------------------------------------------------------------------------------------

SECRET = "s" * 24
HERE = "127.0.0.1:8188"


def refused(path, headers, peer="127.0.0.1", local="127.0.0.1", method="POST"):
    """access.refusal for a request; the Host header defaults to the master's loopback address."""
    from distributed_core import access
    return access.refusal(path, {"Host": HERE, **headers}, peer, local, SECRET)


def test_only_the_relay_is_open():
    assert refused("/prompt", {}) is None  # ComfyUI's own routes are ComfyUI's business
    assert refused("/distributed/relay", {}, method="GET") is None  # a prompt's share token instead
    for path in ("/distributed/result", "/distributed/config", "/api/distributed/config", "/distributed/status",
                 "/distributed/workers/w1/log", "/distributed/secret"):
        assert refused(path, {}), path  # reads as well as changes: a script needs the secret


def test_the_secret_header_lets_any_client_in_but_not_to_the_secret():
    assert refused("/distributed/config", {"X-Distributed-Secret": SECRET}, peer="10.0.0.9", local="10.0.0.1") is None
    assert refused("/distributed/config", {"X-Distributed-Secret": SECRET[:-1] + "x"})
    assert refused("/distributed/config", {"X-Distributed-Secret": "s\udcff" * 12})  # not UTF-8: no error
    reason = refused("/distributed/secret", {"X-Distributed-Secret": SECRET}, peer="10.0.0.9", local="10.0.0.1")
    assert "only in a browser on the master's own machine" in reason


BROWSER = {"Sec-Fetch-Site": "same-origin", "Origin": "http://127.0.0.1:8188"}


def test_a_browser_on_this_machine_on_the_page_itself_is_let_in():
    assert refused("/distributed/config", BROWSER) is None
    assert refused("/distributed/secret", {"Sec-Fetch-Site": "same-origin"}) is None  # a GET has no Origin
    assert refused("/distributed/config", {"Origin": "http://127.0.0.1:8188"}) is None  # no Fetch Metadata
    # the master opened by its network address, from a browser on the same machine
    assert refused("/distributed/config", {**BROWSER, "Host": "192.168.1.5:8188", "Origin": "http://192.168.1.5:8188"},
                   peer="192.168.1.5", local="192.168.1.5") is None
    assert refused("/distributed/config", {**BROWSER, "Host": "[::1]:8188", "Origin": "http://[::1]:8188"},
                   peer="::ffff:127.0.0.1", local="::") is None
    assert refused("/distributed/config", {**BROWSER, "Host": "localhost:8188", "Origin": "http://localhost:8188"}) is None


def test_forged_browser_headers_from_another_machine_get_nothing():
    for peer, local in [("192.168.1.7", "192.168.1.5"), ("10.0.0.2", "0.0.0.0"), (None, None)]:
        for headers in (BROWSER, {"Sec-Fetch-Site": "same-origin"}, {"Origin": "http://127.0.0.1:8188"},
                        {**BROWSER, "Host": "192.168.1.5:8188", "Origin": "http://192.168.1.5:8188"}):
            assert refused("/distributed/config", headers, peer, local), (peer, headers)
            assert refused("/distributed/secret", headers, peer, local), (peer, headers)


def test_another_site_or_a_rebound_name_gets_nothing_even_from_this_machine():
    cases = [
        {"Sec-Fetch-Site": "cross-site", "Origin": "http://evil.example"},
        {"Sec-Fetch-Site": "same-site", "Origin": "http://127.0.0.1:9999"},
        {"Sec-Fetch-Site": "same-origin", "Origin": "http://evil.example"},  # Origin must match too
        {"Origin": "http://evil.example"}, {"Origin": "null"}, {},
        # DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1
        {"Host": "evil.example:8188", "Sec-Fetch-Site": "same-origin", "Origin": "http://evil.example:8188"},
        {"Host": "evil.example:8188", "Sec-Fetch-Site": "same-origin"},
        {"Host": "127.0.0.1.evil.example:8188", "Sec-Fetch-Site": "same-origin"},
        {"Host": "", "Sec-Fetch-Site": "same-origin"}, {"Host": "[", "Sec-Fetch-Site": "same-origin"},
        {"Sec-Fetch-Site": "same-origin", "Origin": "http://["},  # unreadable: refused, never an exception
        {"Sec-Fetch-Site": "same-origin", "Origin": "ftp://127.0.0.1:8188"},
    ]
    for headers in cases:
        assert refused("/distributed/config", headers), headers
        assert refused("/distributed/secret", headers, method="GET"), headers


def test_origin_headers_that_cannot_be_read_are_told_apart():
    from distributed_core import access
    assert all(access.parses_as_origin(o) for o in ("http://127.0.0.1:8188", "https://a.b", "null"))
    assert not any(access.parses_as_origin(o) for o in ("http://[", "http://h:port", "", "x"))


def test_own_names_and_peers():
    from distributed_core import access
    assert access.own_host("127.0.0.2:1", None) and access.own_host("LOCALHOST:1", None)
    assert access.own_host("app.localhost:1", None) and access.own_host("10.1.2.3:1", "10.1.2.3")
    assert not access.own_host("10.1.2.4:1", "10.1.2.3") and not access.own_host("localhost.evil.example", None)
    assert access.from_this_machine("127.0.0.2", "127.0.0.1")  # every loopback address is this machine
    assert access.from_this_machine("10.1.2.3", "10.1.2.3") and not access.from_this_machine("10.1.2.4", "10.1.2.3")
    assert not access.from_this_machine("not an address", "not an address")


@pytest.mark.parametrize("args", [
    "--lowvram", "--reserve-vram 1.5 --cpu-vae", "--preview-method auto --bf16-unet", "--verbose",
    "--verbose DEBUG --log-stdout", "--fast fp16_accumulation --highvram", "--cache-lru=8",
    "--front-end-version Comfy-Org/ComfyUI_legacy_frontend@latest", "",
])
def test_extra_args_that_only_tune_comfyui_pass(args):
    from distributed_core import access
    assert access.extra_args_errors(args) == []


@pytest.mark.parametrize("args, named", [
    ("--listen 0.0.0.0", "--listen"), ("--lowvram --input-directory /", "--input-directory"),
    ("--extra-model-paths-config /x/input/a.yaml", "--extra-model-paths-config"),
    ("--enable-cors", "--enable-cors"),  # argparse would take it for --enable-cors-header
    ("--enable-cors-header", "--enable-cors-header"), ("--listen=0.0.0.0", "--listen=0.0.0.0"),
    ("--front-end-root /", "--front-end-root"), ("--low", "--low"), ("--tls-keyfile k", "--tls-keyfile"),
    ("--port 1", "--port"), ("--base-dir /", "--base-dir"), ("--whitelist-custom-nodes x", "--whitelist-custom-nodes"),
    ("-h", "-h"), ("lowvram", "lowvram"), ("--", "--"),
])
def test_extra_args_that_open_access_or_files_are_refused_by_name(args, named):
    from distributed_core import access
    errors = access.extra_args_errors(args)
    assert errors and named in errors[0] and "by hand" in errors[0]


@pytest.mark.parametrize("args, words", [
    ("--front-end-version someone/frontend@1.0", "not an accepted value"),
    ("--reserve-vram", "needs a value"), ("--reserve-vram -3", "needs a value"), ("--cpu=yes", "takes no value"),
    ("--preview-method ../x", "not an accepted value"), ('--lowvram "', "cannot be split"),
])
def test_extra_args_values_are_checked(args, words):
    from distributed_core import access
    assert any(words in e for e in access.extra_args_errors(args))


def test_no_allowed_flag_is_an_abbreviation_of_a_refused_comfyui_flag():
    """ComfyUI's argparse takes unambiguous prefixes: were an allowed flag missing from some ComfyUI
    and a prefix of a refused one there, it would turn into that one. Checked against the ComfyUI
    under test (COMFYUI_ROOT) and flags of 2024, 2025 and 0.38 ComfyUI."""
    import os
    import re
    from pathlib import Path
    from distributed_core import access
    known = {"--listen", "--port", "--tls-keyfile", "--tls-certfile", "--enable-cors-header", "--max-upload-size",
             "--base-directory", "--extra-model-paths-config", "--output-directory", "--temp-directory",
             "--input-directory", "--auto-launch", "--user-directory", "--front-end-root", "--comfy-api-base",
             "--database-url", "--whitelist-custom-nodes", "--disable-all-custom-nodes", "--multi-user",
             "--windows-standalone-build", "--quick-test-for-ci", "--cuda-device", "--default-device", "--directml"}
    from comfy_shapes import FLAGS_038
    known |= set(FLAGS_038)
    cli = Path(os.environ.get("COMFYUI_ROOT", "/nonexistent")) / "comfy" / "cli_args.py"
    if cli.exists():
        known |= set(re.findall(r"add_argument\(\s*[\"'](--[\w-]+)", cli.read_text(encoding="utf-8")))
    refused_flags = known - set(access.ALLOWED_FLAGS)
    assert "--listen" in refused_flags and "--enable-cors-header" in refused_flags
    for flag in access.ALLOWED_FLAGS:
        assert not [r for r in refused_flags if r.startswith(flag)], flag
    for flag in refused_flags:
        assert access.extra_args_errors(flag), flag


def _flags_038():
    from comfy_shapes import FLAGS_038
    from distributed_core.comfy_flags import ComfyFlags
    return ComfyFlags(Path("/opt/ComfyUI"), "0.38.1", frozenset(FLAGS_038))


@pytest.mark.parametrize("args", ["--fast=--listen", "--verbose=--listen", "--preview-method=-x", "--cache-ram=-1",
                                  "--reserve-vram=-2", "--fast fp16_accumulation --fast=-listen"])
def test_a_value_that_looks_like_a_flag_is_refused(args):
    from distributed_core import access
    for flags in (None, _flags_038()):
        errors = access.extra_args_errors(args, flags)
        assert any("starts with '-'" in e for e in errors), (args, errors)


def test_the_flags_allowed_follow_the_comfyui_that_runs():
    from distributed_core import access
    flags = _flags_038()
    for removed in ("--normalvram", "--disable-ipex-optimize"):
        (error,) = access.extra_args_errors(f"--lowvram {removed}", flags)
        assert error.startswith(f"{removed}: not a flag of ComfyUI 0.38.1 in /opt/ComfyUI") and "remove it" in error
        assert access.extra_args_errors(removed) == []  # a ComfyUI whose flags are unknown: the list alone
    new = "--disable-assets --cache-ram 4 8 --vram-headroom 1.5 --use-ck-attention --disable-dynamic-vram"
    assert access.extra_args_errors(new, flags) == []
    assert access.extra_args_errors("--cache-ram 1 2 3", flags) == ["--cache-ram takes at most 2 values, got 3"]
    older = flags.__class__(Path("/old"), "", frozenset({"--lowvram", "--normalvram", "--cpu"}))
    (error,) = access.extra_args_errors("--disable-assets --use-ck-attention --normalvram", older)
    assert error.startswith("--disable-assets, --use-ck-attention: not a flag of the ComfyUI in /old")


def test_the_flags_allowed_follow_the_comfyui_under_test():
    """The real tree (March 2024 or 0.3.64): a flag of the list is taken exactly when its cli_args.py has it."""
    import os
    from distributed_core import access, comfy_flags
    root = Path(os.environ["COMFYUI_ROOT"])
    text = (root / "comfy" / "cli_args.py").read_text(encoding="utf-8")
    flags = comfy_flags.read(root)
    checked = {flag: f'"{flag}"' in text for flag in ("--normalvram", "--disable-ipex-optimize", "--disable-assets",
                                                      "--lowvram", "--use-ck-attention", "--deterministic")}
    assert checked["--lowvram"] and not checked["--use-ck-attention"]
    for flag, declared in checked.items():
        errors = access.extra_args_errors(flag, flags)
        assert (errors == []) == declared, (flag, errors)
        if not declared:
            assert str(root) in errors[0] and "not a flag of" in errors[0]


def test_a_database_url_is_refused_through_the_api_and_says_why():
    from distributed_core import access
    (error,) = access.extra_args_errors("--database-url sqlite:////tmp/x.db", _flags_038())
    assert error.startswith("--database-url: not allowed through the HTTP API")
    assert "names a file for ComfyUI to create and write" in error


def test_declared_flags_are_read_however_the_call_is_written():
    from distributed_core import comfy_flags
    text = ('parser.add_argument("--listen", type=str)\ngroup.add_argument(\n    "--front-end-version",\n'
            '    type=str)\nparser.add_argument("-v", "--verbose", action="store_true")\n'
            "parser.add_argument('--single', nargs='?')\nparser.add_argument(name)\n")
    assert comfy_flags.declared_in(text) == {"--listen", "--front-end-version", "-v", "--verbose", "--single"}


def test_local_instances_are_checked_against_the_masters_comfyui_and_remote_ones_not():
    from distributed_core import access
    old = config.parse({"workers": [{"id": "a", "port": 9001}, {"id": "b", "host": "10.0.0.5", "port": 9002}]})
    new = config.parse({"master": {"extra_args": "--normalvram"},
                        "workers": [{"id": "a", "port": 9001, "extra_args": "--normalvram"},
                                    {"id": "b", "host": "10.0.0.5", "port": 9002, "extra_args": "--normalvram"}]})
    errors = access.changed_extra_args_errors(old, new, _flags_038())
    assert [e.split(":")[0] for e in errors] == ["master.extra_args", "workers[0].extra_args"]


def test_only_changed_extra_args_are_checked():
    from distributed_core import access
    hand_written = config.parse({"master": {"extra_args": "--output-directory /data"},
                                 "workers": [{"id": "a", "port": 9001, "extra_args": "--listen 0.0.0.0"}]})
    same = config.parse(hand_written.to_dict())
    same.settings.mode = "staggered"
    assert access.changed_extra_args_errors(hand_written, same) == []  # saving settings keeps them
    moved = config.parse({**hand_written.to_dict(), "workers": [{"id": "b", "port": 9002, "extra_args": "--listen 0.0.0.0"}]})
    assert access.changed_extra_args_errors(hand_written, moved)[0].startswith("workers[0].extra_args: --listen")
    changed = config.parse({**hand_written.to_dict(), "master": {"extra_args": "--output-directory /"}})
    assert access.changed_extra_args_errors(hand_written, changed)[0].startswith("master.extra_args:")


def test_secret_is_made_once_and_private(tmp_path):
    from distributed_core import access
    path = tmp_path / "secret.key"
    first = access.load_or_create(path)
    assert access.load_or_create(path) == first and len(first) >= 32
    assert path.stat().st_mode & 0o077 == 0
    assert not [p for p in tmp_path.iterdir() if p != path]  # no temporary file left


def test_instances_starting_at_once_agree_on_one_secret(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    path = tmp_path / "secret.key"
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from distributed_core import access; "
            "from pathlib import Path; t = float(sys.argv[3]); time.sleep(max(0, t - time.time())); "
            "print(access.load_or_create(Path(sys.argv[2])))")
    repo = str(Path(__file__).resolve().parent.parent)
    start = str(time.time() + 1.0)  # all of them at the same moment
    runs = [subprocess.Popen([sys.executable, "-c", code, repo, str(path), start], stdout=subprocess.PIPE, text=True)
            for _ in range(8)]
    seen = {run.communicate(timeout=60)[0].strip() for run in runs}
    assert seen == {path.read_text().strip()}


def test_a_secret_file_others_can_read_is_made_private(tmp_path):
    from distributed_core import access
    path = tmp_path / "secret.key"
    path.write_text("k" * 40 + "\n")
    path.chmod(0o644)
    assert access.load_or_create(path) == "k" * 40
    assert path.stat().st_mode & 0o077 == 0


def test_saving_through_a_symlink_keeps_the_link(tmp_path):
    real = tmp_path / "real" / "gpu_config.json"
    real.parent.mkdir()
    real.write_text(json.dumps(PRODUCT_SHEET_CONFIG))
    link = tmp_path / "gpu_config.json"
    link.symlink_to(real)
    config.save(config.parse({**PRODUCT_SHEET_CONFIG, "settings": {"mode": "staggered"}}), link)
    assert link.is_symlink() and config.load(link).config.settings.mode == "staggered"
    assert json.loads(real.read_text())["settings"]["mode"] == "staggered"


def test_broken_copies_made_in_the_same_second_are_all_kept(tmp_path):
    path = tmp_path / "gpu_config.json"
    for n in range(3):
        path.write_text(f"broken {n}")
        config.save(config.parse(PRODUCT_SHEET_CONFIG), path)
    kept = sorted(p.read_text() for p in tmp_path.glob("gpu_config.json.broken-*"))
    assert kept == ["broken 0", "broken 1", "broken 2"]


# --- split mode -----------------------------------------------------------------------------------

SPLIT = {
    "1": {"class_type": "DistributedEmptyLatent", "inputs": {"width": 64, "height": 64, "batch_size": 10}},
    "2": {"class_type": "DistributedTestDecode", "inputs": {"samples": ["1", 0]}},
    "3": {"class_type": "MultiGPUCollector", "inputs": {"images": ["2", 0]}},
}


def test_split_mode_is_chosen_by_the_latent_node():
    assert workflow.split_batch(SPLIT, ["3"]) == 10
    assert workflow.split_batch(PROMPT, ["3"]) is None
    linked = json.loads(json.dumps(SPLIT))
    linked["1"]["inputs"]["batch_size"] = ["9", 0]
    linked["9"] = {"class_type": "PrimitiveNode", "inputs": {}}
    with pytest.raises(workflow.WorkflowError, match="must be a number"):
        workflow.split_batch(linked, ["3"])
    wp = workflow.worker_prompt(SPLIT, ["3"], {"job": "j"}, [[4, 3]], [0])
    assert workflow.read_field(wp, "1") == {"chunks": [[4, 3]]}


def test_equal_participants_get_equal_shares_one_each():
    shares = plan.split_units(list(range(16)), [("master", 1.0), ("w1", 1.0)])
    assert shares == {"master": list(range(8)), "w1": list(range(8, 16))}
    assert plan.proportional(10, [1.0, 1.0, 1.0]) == [4, 3, 3]  # the remainder to the earlier


def test_unequal_participants_get_shares_in_proportion_to_speed():
    assert plan.proportional(28, [1.0, 2.0, 4.0]) == [4, 8, 16]
    assert plan.proportional(7, [0.0, 1.0]) == [0, 7]
    assert plan.proportional(5, [0.0, 0.0]) == [3, 2]  # nothing known: as if equal
    shares = plan.split_units(list(range(3)), [("master", 0.1), ("w1", 5.0), ("w2", 5.0)])
    assert shares == {"w1": [0, 1], "w2": [2]}  # an empty share is no share
    assert sorted(u for units in shares.values() for u in units) == [0, 1, 2]


def test_a_failed_share_is_divided_among_those_left():
    missing = [8, 9, 10, 11, 12, 13]
    parts = plan.split_units(missing, [("w2", 1.0), ("w3", 2.0)])
    assert parts == {"w2": [8, 9], "w3": [10, 11, 12, 13]}
    assert plan.chunks_of([9, 3, 4, 5]) == [[3, 3], [9, 1]]


def test_execution_time_comes_from_history_timestamps():
    from distributed_core.watch import execution_seconds, execution_started
    entry = {"status": {"messages": [["execution_start", {"prompt_id": "p", "timestamp": 1_000_000}],
                                     ["execution_cached", {"nodes": [], "timestamp": 1_000_100}],
                                     ["execution_success", {"prompt_id": "p", "timestamp": 1_002_500}]]}}
    assert execution_seconds(entry) == pytest.approx(2.5)
    assert execution_started(entry) == pytest.approx(1000.0)
    old = {"status": {"messages": [["execution_start", {"prompt_id": "p"}]]}}  # ComfyUI of early 2024
    assert execution_seconds(old) is None and execution_started(old) is None
    assert execution_seconds({}) is None


def test_throughput_is_kept_across_restarts(tmp_path):
    path = tmp_path / "throughput.json"
    rates = plan.Throughput(path)
    assert rates.rate("sig", "w") == 1.0
    rates.observe("sig", "w", 8, 2.0)
    rates.observe("sig", "v", 2, 2.0)
    again = plan.Throughput(path)
    assert again.rate("sig", "w") == 4.0 and again.rate("sig", "v") == 1.0
    assert again.rate("sig", "new") in (1.0, 4.0) and again.rate("other", "w") == 1.0
    path.write_text("garbage")
    assert plan.Throughput(path).rate("sig", "w") == 1.0


def test_signature_ignores_seeds_and_text_but_not_settings():
    base = {"1": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 20, "text": "a cat"}}}
    other = {"1": {"class_type": "KSampler", "inputs": {"seed": 9, "steps": 20, "text": "a dog"}}}
    slower = {"1": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 40, "text": "a cat"}}}
    assert plan.signature(base, ["1"]) == plan.signature(other, ["1"]) != plan.signature(slower, ["1"])


def test_the_summary_counts_images_not_seed_slots():
    """Two images per seed slot: the panel reads 2 of 6 images once the master's arrive, and each
    share its own images; one kept apart (another layout) counts its own rows."""
    store = JobStore()
    job = _job(units=(0, 1, 2))
    job.shares["master"] = Share("master", "master", [0])
    store.add(job)
    assert store.get("j1").summary()["images_due"] is None  # not known before the first part
    store.put_local("j1", "3", 0, 1, np.zeros((2, 2, 2, 3), np.float32))
    token = _token(job, 1)
    summary = store.get("j1").summary()
    assert (summary["images"], summary["images_due"]) == (2, 6)
    _send(store, wire.frame("j1", "3", 1, 1, token, np.ones((2, 2, 2, 3), np.float32), "float32"))
    summary = store.get("j1").summary()
    assert summary["images"] == 4 and [s["images"] for s in summary["shares"]] == [2, 2]
    assert summary["shares"][1]["steps"] == []  # no step told yet


def test_split_results_cover_ranges():
    store = JobStore()
    job = Job(id="s", collectors=["3"], units=list(range(6)), split=True)
    store.add(job)
    store.put_local("s", "3", 0, 2, np.zeros((2, 1, 1, 1), np.float32))
    _send(store, wire.frame("s", "3", 4, 2, _token(job, 4, 5), np.ones((2, 1, 1, 1), np.float32), "float32"))
    with pytest.raises(wire.Rejected) as info:  # a share given again after a failure, say
        store.check(wire.Header("s", "3", 3, _token(job, 3, 4), "uint8", (2, 1, 1, 1), 2))  # overlaps 4
    assert info.value.status == 409
    _send(store, wire.frame("s", "3", 2, 2, _token(job, 2, 3), np.full((2, 1, 1, 1), 0.5, np.float32), "float32"))
    assert store.wait("s", "3", 0) == (6, True)
    (batch,) = store.take("s", "3")
    assert batch.reshape(-1).tolist() == [0, 0, 0.5, 0.5, 1, 1]


# --- transport: frames received straight into the final batch -------------------------------------

import asyncio  # noqa: E402

from distributed_core.jobs import receive  # noqa: E402


def _reader(data: bytes, chunk: int = 7919):
    reader = asyncio.StreamReader()
    for i in range(0, len(data), chunk):  # odd-sized pieces, as a socket would give them
        reader.feed_data(data[i:i + chunk])
    reader.feed_eof()
    return reader


def _send(store, parts, cut: int = 0):
    data = b"".join(bytes(p) for p in parts)
    return _deliver(store, data[:len(data) - cut], len(data) - cut)


def _deliver(store, data: bytes, length):
    async def go():
        return await receive(store, _reader(data), length)
    return asyncio.run(go())


@pytest.mark.parametrize("transport, tolerance", [("float32", 0.0), ("uint8", 0.5 / 255), ("png", 0.5 / 255)])
def test_every_transport_lands_in_place(transport, tolerance):
    store = JobStore()
    job = Job(id="t", collectors=["4"], units=[0, 1, 2])
    store.add(job)
    rng = np.random.default_rng(1)
    shares = [rng.random((2, 33, 17, 3), dtype=np.float32) for _ in range(3)]
    store.put_local("t", "4", 0, 1, shares[0])
    for unit in (2, 1):  # out of order
        _send(store, wire.frame("t", "4", unit, 1, _token(job, unit), shares[unit], transport))
    assert store.wait("t", "4", 0) == (3, True)
    parts = store.take("t", "4")
    assert len(parts) == 1 and parts[0].shape == (6, 33, 17, 3)  # one buffer, no joining
    assert np.abs(parts[0] - np.concatenate(shares)).max() <= tolerance + 1e-7


def test_a_share_of_another_size_is_kept_apart():
    store = JobStore()
    job = Job(id="t", collectors=["4"], units=[0, 1])
    store.add(job)
    store.put_local("t", "4", 0, 1, np.zeros((1, 4, 4, 3), np.float32))
    _send(store, wire.frame("t", "4", 1, 1, _token(job, 1), np.ones((2, 4, 4, 3), np.float32), "uint8"))
    parts = store.take("t", "4")
    assert [p.shape[0] for p in parts] == [1, 2] and parts[1].max() == 1.0


@pytest.mark.parametrize("transport, bad", [("float32", np.nan), ("float32", np.inf), ("float16", np.nan),
                                            ("float16", -np.inf)])
def test_a_frame_of_values_that_are_not_numbers_is_refused_on_arrival(transport, bad):
    store = JobStore()
    job = Job(id="t", collectors=["4"], units=[0, 1])
    store.add(job)
    token = _token(job, 1)
    images = np.zeros((1, 4, 4, 3), np.float32)
    images[0, 3, 2, 1] = bad
    header = wire.Header("t", "4", 1, token, transport, images.shape)
    with pytest.raises(wire.Rejected) as info:
        _send(store, wire.encode(header, images.astype(wire.DTYPES[transport])))
    assert info.value.status == 400 and "not finite numbers" in info.value.message and transport in info.value.message
    assert store.get("t").delivered("4") == 0 and not store.get("t").inflight
    _send(store, wire.encode(header, np.zeros((1, 4, 4, 3), wire.DTYPES[transport])))
    assert store.get("t").delivered("4") == 1


def test_audio_that_is_not_numbers_is_refused_on_arrival():
    store = JobStore()
    job = Job(id="t", collectors=["4"], units=[0, 1], audio={"4"})
    store.add(job)
    waveform = np.zeros((1, 2, 50), np.float32)
    waveform[0, 1, 7] = np.nan
    parts = wire.frame("t", "4", 1, 1, _token(job, 1), np.zeros((1, 4, 4, 3), np.float32), "uint8", (waveform, 44100))
    with pytest.raises(wire.Rejected) as info:
        _send(store, parts)
    assert info.value.status == 400 and "audio" in info.value.message and "not finite" in info.value.message
    assert store.get("t").delivered("4") == 0


@pytest.mark.parametrize("first", ["master", "worker"])
@pytest.mark.parametrize("other", [(1, 8, 4, 3), (1, 4, 8, 3), (1, 4, 4, 4)])
def test_a_frame_of_another_image_size_is_refused_on_arrival(first, other):
    store = JobStore()
    job = Job(id="t", collectors=["4"], units=[0, 1, 2])
    store.add(job)
    if first == "master":
        store.put_local("t", "4", 0, 1, np.zeros((2, 4, 4, 3), np.float32))
    else:
        _send(store, wire.frame("t", "4", 2, 1, _token(job, 2, participant="worker2"),
                                np.zeros((2, 4, 4, 3), np.float32), "float32"))
    with pytest.raises(wire.Rejected) as info:
        _send(store, wire.frame("t", "4", 1, 1, _token(job, 1), np.zeros(other, np.float32), "uint8"))
    h, w, c = other[1:]
    assert info.value.status == 400, info.value.message
    assert f"sent {w}x{h} {c}-channel images" in info.value.message and "holds 4x4 3-channel" in info.value.message
    assert store.get("t").delivered("4") == 1 and not store.get("t").inflight


def test_a_frame_refused_midway_sets_no_size():
    store = JobStore()
    job = Job(id="t", collectors=["4"], units=[1, 2])
    store.add(job)
    data = b"".join(bytes(p) for p in wire.frame("t", "4", 1, 1, _token(job, 1), np.zeros((1, 8, 8, 3)), "float32"))
    with pytest.raises(wire.Rejected):
        _deliver(store, data[:-10], None)  # truncated: nothing arrived
    _send(store, wire.frame("t", "4", 2, 1, _token(job, 2, participant="w2"), np.zeros((1, 4, 4, 3)), "float32"))
    assert store.get("t").delivered("4") == 1


def test_split_chunks_land_at_their_global_rows():
    store = JobStore()
    job = Job(id="s", collectors=["4"], units=list(range(5)), split=True)
    store.add(job)
    images = np.arange(5, dtype=np.float32).reshape(5, 1, 1, 1) / 10
    store.put_local("s", "4", 0, 2, images[:2])
    _send(store, wire.frame("s", "4", 4, 1, _token(job, 4), images[4:], "float32"))
    _send(store, wire.frame("s", "4", 2, 2, _token(job, 2, 3), images[2:4], "float32"))
    (batch,) = store.take("s", "4")
    assert np.array_equal(batch, images)


@pytest.mark.parametrize("mangle, status, words", [
    (lambda parts: (parts, 1), 400, "truncated"),
    (lambda parts: (parts, 2000), 400, "truncated"),
    (lambda parts: ([b"XXXX" + bytes(parts[0])[4:], parts[1]], 0), 400, "magic"),
    (lambda parts: ([parts[0], bytes(parts[1]) + b"extra"], 0), 400, "longer"),
])
def test_broken_bodies_are_refused_and_leave_nothing_behind(mangle, status, words):
    store = JobStore()
    job = Job(id="t", collectors=["4"], units=[1])
    store.add(job)
    token = _token(job, 1)
    parts, cut = mangle(wire.frame("t", "4", 1, 1, token, np.zeros((1, 16, 16, 3), np.float32), "float32"))
    data = b"".join(bytes(p) for p in parts)
    data = data[:len(data) - cut]
    with pytest.raises(wire.Rejected) as info:
        _deliver(store, data, None)
    assert info.value.status == status and words in info.value.message
    assert store.get("t").delivered("4") == 0 and not store.get("t").inflight
    # the unit can still be delivered properly afterwards
    _send(store, wire.frame("t", "4", 1, 1, token, np.zeros((1, 16, 16, 3), np.float32), "float32"))
    assert store.get("t").delivered("4") == 1


def test_png_bigger_than_its_header_is_refused_before_decoding():
    store = JobStore()
    job = Job(id="t", collectors=["4"], units=[1])
    store.add(job)
    big = wire.pack_png(np.zeros((1, 64, 64, 3), np.uint8))  # a 64x64 PNG ...
    header = wire.Header("t", "4", 1, _token(job, 1), "uint8", (1, 8, 8, 3), 1, "png", len(big))  # ... sold as 8x8
    with pytest.raises(wire.Rejected) as info:
        _send(store, [header.to_bytes(), big])
    assert info.value.status == 400 and "64" in info.value.message


def test_a_declared_size_that_does_not_match_the_body_is_refused():
    store = JobStore()
    job = Job(id="t", collectors=["4"], units=[1])
    store.add(job)
    data = b"".join(bytes(p) for p in wire.frame("t", "4", 1, 1, _token(job, 1), np.zeros((1, 2, 2, 3)), "float32"))
    with pytest.raises(wire.Rejected) as info:
        _deliver(store, data, len(data) + 5)
    assert info.value.status == 400


def test_input_files_of_loaders():
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
              "2": {"class_type": "LoadImageMask", "inputs": {"image": "sub/b.png [input]", "channel": "alpha"}},
              "3": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
              "4": {"class_type": "EmptyImage", "inputs": {"width": 8}}}
    assert workflow.input_files(prompt) == ["a.png", "sub/b.png"]


def test_only_collectors_that_run_are_planned():
    assert workflow.reached(CHAINED, ["3", "5"], ["6"]) == ["3", "5"]
    assert workflow.reached(CHAINED, ["3", "5"], ["7"]) == []  # a preview before the Collectors
    assert workflow.reached(CHAINED, ["3", "5"], ["3", "nope"]) == ["3"]
    from runtimes import make_runtime

    def nothing_to_load():
        raise AssertionError("a prompt whose Collectors do not run needs no plan")
    runtime = make_runtime(None, None, port=8188, load=nothing_to_load, partial_execution=True)
    data = {"prompt": CHAINED, "partial_execution_targets": ["7"]}
    assert runtime._rewrite(data) is data and data["prompt"] is CHAINED and not runtime.collectors.store.active()


def test_the_ray_section_round_trips_and_bad_ones_are_named():
    parsed = config.parse({"ray": {"address": "ray://head:10001", "workers": 4, "extra_args": "--lowvram"}})
    assert parsed.ray == config.RaySettings("ray://head:10001", 4, "", "--lowvram")
    assert config.parse(parsed.to_dict()).ray == parsed.ray
    assert config.parse({}).ray is None and "ray" not in config.parse({}).to_dict()
    assert config.parse({"ray": {}}).ray == config.RaySettings()  # auto, one per GPU
    for bad, words in [({"ray": []}, "ray: must be an object"),
                       ({"ray": {"address": "head"}}, "ray.address: must be auto, host:port"),
                       ({"ray": {"workers": -1}}, "ray.workers"),
                       ({"ray": {"extra_args": "--cpu; rm"}}, "ray.extra_args: shell characters"),
                       ({"ray": {"nodes": 2}}, "ray"),
                       ({"ray": {}, "workers": [{"id": "ray-1", "port": 8189}]}, "the Ray workers' own")]:
        with pytest.raises(config.ConfigError, match=words.replace(".", r"\.")):
            config.parse(bad)


def test_ray_extra_args_through_the_api_take_the_allow_list_too():
    from distributed_core import access
    old = config.parse({"ray": {"extra_args": "--front-end-root /by/hand"}})
    assert access.changed_extra_args_errors(old, old) == []  # written by hand: kept as it is
    new = config.parse({"ray": {"extra_args": "--front-end-root /elsewhere"}})
    assert any(e.startswith("ray.extra_args: ") for e in access.changed_extra_args_errors(old, new))
    assert access.changed_extra_args_errors(old, config.parse({"ray": {"extra_args": "--lowvram"}})) == []


def test_a_ray_section_without_ray_installed_says_how_to_install_it(monkeypatch):
    import sys

    from distributed_core import ray_workers
    from distributed_core.config import Loaded
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed: importing it fails
    pool = ray_workers.RayWorkers(lambda: config.RaySettings(address="auto", workers=2), lambda: "/nowhere")
    pool.tick()
    assert pool.members == {} and "pip install 'ray[default]'" in pool.error
    loaded = Loaded(config.parse({"ray": {}, "workers": [{"id": "w1", "port": 8189}]}), None)
    assert pool.merged(loaded) is loaded  # the configured workers, as they are
    pool.members = {"ray-2": ray_workers.Member("ray-2", "10.0.0.7", 41000, ("1",), 1, "n"),
                    "ray-1": ray_workers.Member("ray-1", "10.0.0.6", 41001, ("0",), 2, "n")}
    merged = pool.merged(loaded).config
    assert [(w.id, w.host, w.port) for w in merged.workers] == [("w1", "127.0.0.1", 8189), ("ray-1", "10.0.0.6", 41001),
                                                                ("ray-2", "10.0.0.7", 41000)]
    assert pool.view()["workers"][0]["id"] == "ray-1"
