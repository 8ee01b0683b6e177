"""The worker doctor's logic on plain values: what an instance lacks for a prompt, versions, the
reach-back's target and outcome, and the sentence that says what to do."""
from __future__ import annotations

import asyncio

from distributed_core import doctor

INFO = {
    "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["a.safetensors", "sub/b.ckpt"]]}}},
    "LoraLoader": {"input": {"required": {"model": ["MODEL"], "lora_name": [["style.safetensors"]],
                                          "strength_model": ["FLOAT", {"default": 1.0}]}}},
    "KSampler": {"input": {"required": {"seed": ["INT", {}], "sampler_name": [["euler", "dpmpp_2m"]]}}},
    "UpscaleModelLoader": {"input": {"required": {"model_name": ["COMBO", {"options": ["4x.pth"]}]}}},
    "LoadImage": {"input": {"required": {"image": [["here.png"], {"image_upload": True}]}}},
    "MultiGPUCollector": {"input": {"required": {"images": ["IMAGE"]}}},
}


def test_choices_read_both_shapes_of_object_info():
    assert doctor.choices([["x", "y"], {}]) == ["x", "y"]
    assert doctor.choices(["COMBO", {"options": ["z"]}]) == ["z"]
    assert doctor.choices(["INT", {"min": 0}]) is None and doctor.choices("IMAGE") is None
    assert doctor.choices([]) is None and doctor.choices(None) is None


def test_lacking_names_models_nodes_and_choices_and_nothing_else():
    prompt = {
        "10": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "big.safetensors"}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["10", 0], "lora_name": "style.safetensors",
                                                     "strength_model": 1.0}},
        "3": {"class_type": "KSampler", "inputs": {"seed": 5, "sampler_name": "res_multistep"}},
        "4": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "8x.pth"}},
        "5": {"class_type": "SomeCustomNode", "inputs": {}},
        "6": {"class_type": "LoadImage", "inputs": {"image": "photo.png [input]"}},
        "7": {"class_type": "MultiGPUCollector", "inputs": {"images": ["6", 0]}},
    }
    found = doctor.lacking(prompt, INFO, ["photo.png"])
    assert [(e["kind"], e["name"], e["node"]) for e in found] == [
        ("choice", "res_multistep", "3"), ("model", "8x.pth", "4"), ("node", "SomeCustomNode", "5"),
        ("model", "big.safetensors", "10")]  # in node order; the uploaded input file is not reported
    assert found[1]["folder"] == "upscale_models" and found[3]["folder"] == "checkpoints"
    assert found[3]["input"] == "ckpt_name" and found[3]["class_type"] == "CheckpointLoaderSimple"
    # what keeps a worker out of a job: nodes and models, not other choices
    assert [e["name"] for e in doctor.blocking(prompt, INFO, ["photo.png"])] == ["8x.pth", "SomeCustomNode",
                                                                                 "big.safetensors"]


def test_lacking_is_empty_when_the_instance_has_everything():
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sub/b.ckpt"}},
              "2": {"class_type": "LoadImage", "inputs": {"image": "here.png"}}}
    assert doctor.lacking(prompt, INFO) == []
    # an input file that the worker lacks and that is not uploaded is reported
    assert [e["name"] for e in doctor.lacking({"1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}}},
                                              INFO)] == ["x.png"]


def test_missing_inputs_only_those_the_master_lacks_too():
    found = doctor.missing_inputs(["a.png", "b.png"], lambda name: name == "a.png")
    assert [(e["kind"], e["name"]) for e in found] == [("input", "b.png")]


def test_lack_reason_names_each_thing_and_the_remedy():
    entries = doctor.lacking({"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "m.safetensors"}},
                              "5": {"class_type": "Other", "inputs": {}}}, INFO)
    reason = doctor.lack_reason(entries)
    assert "models/checkpoints/m.safetensors" in reason and "node class 'Other'" in reason
    assert "copy the model files" in reason and "install the same custom nodes" in reason and "disable it" in reason


def test_version_in_reads_the_project_table_only():
    text = '[tool.x]\nversion = "9"\n[project]\nname = "a"\nversion = "1.2.3"  # note\n'
    assert doctor.version_in(text) == "1.2.3"
    assert doctor.version_in("[project]\nname='a'\n") == "unknown"
    assert doctor.extension_version() != "unknown"  # this repository's pyproject.toml


def test_comfyui_version_from_system_stats_or_unknown():
    assert doctor.comfyui_version({"system": {"comfyui_version": "0.3.64"}}) == "0.3.64"
    assert doctor.comfyui_version({"system": {"os": "posix"}}) == "unknown"
    assert doctor.comfyui_version(None) == "unknown"


def test_message_says_what_to_do_in_one_sentence():
    ready = {"role": "worker", "reachable": True, "extension": True, "extension_version": "1", "relay": True,
             "missing": []}
    assert doctor.message(ready, "1") == "Ready."
    assert doctor.message({"role": "master", "extension_version": "1"}, "1").startswith("Ready")
    down = doctor.message({"role": "worker", "reachable": False, "error": "cannot connect"}, "1")
    assert "start it" in down and "cannot connect" in down
    assert "not installed" in doctor.message({**ready, "extension": False}, "1")
    several = doctor.message({**ready, "extension_version": "0.9", "relay": False,
                              "relay_error": "http://10.0.0.1:8188/distributed/relay answered 502",
                              "missing": [{"kind": "model", "name": "m.safetensors", "folder": "checkpoints"}]}, "1")
    assert "Update ComfyUI-Distributed" in several and "http://10.0.0.1:8188/distributed/relay answered 502" in several
    assert "websockets" in several and "m.safetensors" in several
    assert several.endswith(".") and several.count(". ") == 0  # one sentence


def test_worker_part_is_what_the_collector_needs():
    prompt = {"1": {"class_type": "A", "inputs": {}}, "2": {"class_type": "MultiGPUCollector", "inputs": {"images": ["1", 0]}},
              "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0]}}, "4": {"class_type": "Unrelated", "inputs": {}}}
    assert set(doctor.worker_part(prompt)) == {"1", "2"}
    assert doctor.worker_part({"1": {"class_type": "A", "inputs": {}}}) == {"1": {"class_type": "A", "inputs": {}}}


def test_object_info_cache_fetches_once_per_ttl_and_shares_a_fetch():
    now = [0.0]
    calls = []

    async def scenario():
        cache = doctor.ObjectInfoCache(ttl=30, clock=lambda: now[0])

        async def fetch():
            calls.append(1)
            await asyncio.sleep(0.01)
            return {"n": len(calls)}
        first, second = await asyncio.gather(cache.get("w", fetch), cache.get("w", fetch))
        assert first == second == {"n": 1}
        assert await cache.get("w", fetch) == {"n": 1}
        now[0] = 31
        assert await cache.get("w", fetch) == {"n": 2}

        async def broken():
            raise RuntimeError("down")
        now[0] = 100
        try:
            await cache.get("w", broken)
        except RuntimeError:
            pass
        else:
            raise AssertionError("a failed fetch must raise")
        assert await cache.get("w", fetch) == {"n": 3}  # a failure is not kept
    asyncio.run(scenario())


def test_prompt_problem_names_what_is_wrong():
    assert doctor.prompt_problem({"1": {"class_type": "A", "inputs": {}}}) is None
    assert doctor.prompt_problem({"1": {"class_type": "A"}}) is None
    assert "object of nodes" in doctor.prompt_problem([1])
    assert "class_type" in doctor.prompt_problem({"1": 5})
    assert "class_type" in doctor.prompt_problem({"1": {"inputs": {}}})
    assert "inputs" in doctor.prompt_problem({"1": {"class_type": "LoadImage", "inputs": ["x"]}})
