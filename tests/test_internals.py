"""The touches of ComfyUI internals (distributed_core/comfy_internals.py), each against the shapes
of the ComfyUI versions it was written for: March 2024 and 0.3.64 (also run for real in the
end-to-end tests), and 0.38, which cannot run here and is re-created from its files."""
from __future__ import annotations

import sys
import types

import pytest

from distributed_core import comfy_internals

RUN = {"6": {"class_type": "DistributedSpreadReceiver", "inputs": {}}}
SUBMITTED = {"6": {"class_type": "VAEDecode", "inputs": {}}}


def original(value):
    return SUBMITTED if value is RUN else value


class Hidden:  # comfy_api's io.Hidden members are enum values used as keys
    prompt = "Hidden.prompt"
    unique_id = "Hidden.unique_id"


@pytest.fixture
def fake_modules(monkeypatch):
    def install(name: str, **attributes) -> types.ModuleType:
        module = types.ModuleType(name)
        for key, value in attributes.items():
            setattr(module, key, value)
        monkeypatch.setitem(sys.modules, name, module)
        return module
    return install


@pytest.mark.parametrize("version", ["2024-03", "0.3.64", "0.38"])
def test_output_nodes_get_the_submitted_prompt_in_every_shape(fake_modules, version):
    def get_input_data(inputs, class_def, unique_id, *rest, **kwargs):
        v1 = {"images": [object()], "prompt": [RUN], "unique_id": ["6"]}
        if version == "2024-03":
            return v1
        hidden = {Hidden.prompt: RUN, Hidden.unique_id: "6"}
        if version == "0.3.64":
            return v1, [], hidden
        return v1, [], {"hidden_inputs": hidden, "dynamic_paths": {}}  # 0.38: v3_data

    execution = fake_modules("execution", get_input_data=get_input_data)
    assert comfy_internals.restore_hidden_prompt(original)
    assert not comfy_internals.restore_hidden_prompt(original)  # once
    result = execution.get_input_data({}, object, "6", None)
    v1 = result if version == "2024-03" else result[0]
    assert v1["prompt"] == [SUBMITTED] and v1["unique_id"] == ["6"]
    if version == "0.3.64":
        assert result[2][Hidden.prompt] is SUBMITTED and result[2][Hidden.unique_id] == "6"
    if version == "0.38":
        assert result[2]["hidden_inputs"][Hidden.prompt] is SUBMITTED
        assert result[2]["dynamic_paths"] == {}


def test_other_prompts_are_left_alone(fake_modules):
    other = {"1": {"class_type": "X", "inputs": {}}}
    execution = fake_modules("execution", get_input_data=lambda *a, **k: ({"prompt": [other]}, [], {Hidden.prompt: other}))
    comfy_internals.restore_hidden_prompt(original)
    data, _missing, hidden = execution.get_input_data()
    assert data["prompt"][0] is other and hidden[Hidden.prompt] is other


def test_without_get_input_data_nothing_is_wrapped(fake_modules):
    fake_modules("execution")
    assert not comfy_internals.restore_hidden_prompt(original)


def test_the_upscale_model_node_is_called_through_its_v3_execute_first(fake_modules):
    calls = []

    class Output:
        def __init__(self, *values):
            self.result = values

    class V3Node:  # 0.3.64 on: a classmethod execute returning NodeOutput; `upscale` is an alias to go
        @classmethod
        def define_schema(cls):
            return None

        @classmethod
        def execute(cls, upscale_model, image):
            calls.append(("execute", upscale_model, image))
            return Output("bigger")

        @classmethod
        def upscale(cls, upscale_model, image):  # 0.3.64's alias of execute, marked "# TODO: remove"
            calls.append(("alias", upscale_model, image))
            return Output("bigger")

    class V1Node:  # March 2024
        FUNCTION = "upscale"

        def upscale(self, upscale_model, image):
            calls.append(("upscale", upscale_model, image))
            return ("bigger v1",)

    nodes = fake_modules("nodes", NODE_CLASS_MAPPINGS={"ImageUpscaleWithModel": V3Node})
    assert comfy_internals.upscale_with_model("model", "image") == "bigger"
    nodes.NODE_CLASS_MAPPINGS = {"ImageUpscaleWithModel": V1Node}
    assert comfy_internals.upscale_with_model("model", "image") == "bigger v1"
    assert calls == [("execute", "model", "image"), ("upscale", "model", "image")]
    nodes.NODE_CLASS_MAPPINGS = {}
    with pytest.raises(comfy_internals.MissingNode, match="no ImageUpscaleWithModel"):
        comfy_internals.upscale_with_model("model", "image")


def test_the_running_prompt_comes_from_the_executing_context_or_the_server(fake_modules):
    server = types.SimpleNamespace(last_prompt_id="from-server")
    fake_modules("server", PromptServer=types.SimpleNamespace(instance=server))
    fake_modules("comfy_execution.utils", get_executing_context=lambda: None)  # between nodes
    assert comfy_internals.running_prompt_id() == "from-server"
    fake_modules("comfy_execution.utils",
                 get_executing_context=lambda: types.SimpleNamespace(prompt_id="from-context"))
    assert comfy_internals.running_prompt_id() == "from-context"
    server.last_prompt_id = None
    fake_modules("comfy_execution.utils")  # March 2024 has no executing context
    assert comfy_internals.running_prompt_id() is None


def test_put_is_followed_by_the_wake_up():
    queue = types.SimpleNamespace(items=[])
    queue.put = queue.items.append
    woken = []
    comfy_internals.wrap_put(queue, lambda: woken.append(len(queue.items)))
    queue.put((1, "p1", {}, {}, [], {}))
    assert queue.items == [(1, "p1", {}, {}, [], {})] and woken == [1]


def test_server_args_read_comfyuis_command_line(fake_modules):
    fake_modules("comfy.cli_args", args=types.SimpleNamespace(listen="0.0.0.0, ::", port=8190, cpu=True))
    assert comfy_internals.server_args() == (["0.0.0.0", "::"], 8190, True)
    fake_modules("comfy.cli_args")
    assert comfy_internals.server_args() == (["127.0.0.1"], 8188, False)


def test_partial_runs_are_known_by_validate_prompts_parameters(fake_modules):
    async def old(prompt):  # noqa: ARG001
        return None

    async def new(prompt_id, prompt, partial_execution_list):  # noqa: ARG001
        return None
    fake_modules("execution", validate_prompt=old)
    assert not comfy_internals.runs_partial_targets()
    fake_modules("execution", validate_prompt=new)
    assert comfy_internals.runs_partial_targets()


def test_queue_items_are_read_by_their_stable_fields_only():
    five = (1, "p1", {"1": {}}, {}, ["1"])
    assert comfy_internals.item_prompt(five) is five[2] and comfy_internals.item_outputs(five) == ["1"]
    six = five + ({"api_key_comfy_org": "x"},)
    assert comfy_internals.item_prompt(six) is six[2] and comfy_internals.item_outputs(six) == ["1"]
    assert comfy_internals.item_prompt((1, "p1")) is None and comfy_internals.item_outputs("x") is None
