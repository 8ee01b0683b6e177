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


class ExecutionStatus(tuple):
    """PromptQueue.ExecutionStatus: a named tuple (status_str, completed, messages)."""
    _fields = ("status_str", "completed", "messages")

    def __new__(cls, status_str, completed, messages):
        return super().__new__(cls, (status_str, completed, messages))

    messages = property(lambda self: self[2])

    def _replace(self, **changes):
        return ExecutionStatus(*(changes.get(f, self[k]) for k, f in enumerate(self._fields)))


@pytest.mark.parametrize("version", ["0.3.64", "0.38"])
def test_a_spread_prompt_a_worker_rendered_is_timed_from_when_it_got_it(version):
    done = []

    class Queue:  # task_done as 0.3.64 has it; 0.38 adds process_item
        currently_running = {4: (1, "spread", {}, {}, []), 5: (2, "local", {}, {}, [])}

        def task_done(self, item_id, history_result, status, *more, **named):
            done.append((self.currently_running.pop(item_id)[1], status, more, named))

    queue = Queue()
    assert comfy_internals.retime_finished(queue, lambda pid: 100.0 if pid == "spread" else None)
    messages = [("execution_start", {"prompt_id": "spread", "timestamp": 160_000}),
                ("execution_success", {"prompt_id": "spread", "timestamp": 160_020})]
    extra = {"process_item": str} if version == "0.38" else {}
    queue.task_done(4, {"outputs": {}}, ExecutionStatus("success", True, messages), **extra)
    queue.task_done(5, {"outputs": {}}, ExecutionStatus("success", True, messages), **extra)
    (_, spread, _, named), (_, local, _, _) = done
    assert spread.messages[0] == ("execution_start", {"prompt_id": "spread", "timestamp": 100_000})
    assert spread.messages[1] == messages[1] and named == extra
    assert local.messages == messages  # a prompt the master rendered keeps ComfyUI's times
    queue.currently_running[6] = (3, "spread", {}, {}, [])
    queue.task_done(6, {}, None)  # no status (ComfyUI before mid-2024 may give none): passed on as it is
    assert done[-1][1] is None
    assert not comfy_internals.retime_finished(types.SimpleNamespace(task_done=lambda *a: None), lambda pid: None)


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


PARAMS = {"steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 0.35}


def _noise_of(latent, seed):  # comfy.sample.prepare_noise's shape: noise for a latent from one seed
    import torch
    return torch.full_like(latent, float(seed))


def test_a_batch_is_sampled_in_one_run_with_each_latents_noise_from_its_own_seed(fake_modules):
    import torch
    runs = []

    def sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
               denoise=1.0, disable_pbar=False, seed=None):
        runs.append((noise.shape[0], seed, disable_pbar, denoise))
        return latent_image + noise
    fake_modules("comfy.sample", prepare_noise=_noise_of, sample=sample)
    fake_modules("comfy.utils", PROGRESS_BAR_ENABLED=False)
    out = comfy_internals.sample_batch("model", torch.zeros(3, 4, 2, 2), [5, 6, 7], PARAMS, "pos", "neg")
    assert runs == [(3, 5, True, 0.35)]
    assert [float(out[i].mean()) for i in range(3)] == [5.0, 6.0, 7.0]


def test_a_wrapped_sampler_that_takes_keywords_is_still_used_in_batches(fake_modules):
    import torch
    sizes = []

    def wrapped(model, noise, *rest, **kwargs):  # another extension's wrapper, without functools.wraps
        sizes.append(noise.shape[0])
        return noise
    fake_modules("comfy.sample", prepare_noise=_noise_of, sample=wrapped)
    comfy_internals.sample_batch("model", torch.zeros(2, 4, 2, 2), [1, 2], PARAMS, "pos", "neg")
    assert sizes == [2]


def test_without_comfy_sample_in_its_shape_each_latent_goes_through_common_ksampler(fake_modules):
    import torch
    calls = []

    def common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, denoise=1.0):
        calls.append((seed, latent["samples"].shape[0], denoise))
        return ({"samples": latent["samples"] + seed},)
    fake_modules("comfy.sample", sample=lambda model, noise: noise)  # an unknown shape
    fake_modules("nodes", common_ksampler=common_ksampler)
    out = comfy_internals.sample_batch("model", torch.zeros(2, 4, 2, 2), [3, 9], PARAMS, "pos", "neg")
    assert calls == [(3, 1, 0.35), (9, 1, 0.35)]
    assert [float(out[i].mean()) for i in range(2)] == [3.0, 9.0]


def test_memory_touches_fall_back_to_torch_and_the_cpu(fake_modules):
    import torch

    class Oom(RuntimeError):
        pass
    emptied = []
    fake_modules("comfy.model_management", OOM_EXCEPTION=Oom, soft_empty_cache=lambda: emptied.append(1),
                 get_torch_device=lambda: "cuda:3")
    assert comfy_internals.out_of_memory_error() is Oom
    comfy_internals.free_gpu_cache()
    assert emptied == [1] and comfy_internals.compute_device() == "cuda:3"
    fake_modules("comfy.model_management")
    assert comfy_internals.out_of_memory_error() is torch.cuda.OutOfMemoryError
    comfy_internals.free_gpu_cache()
    assert comfy_internals.compute_device() == torch.device("cpu")


def test_the_vae_samples_its_latent_only_where_its_regularization_says_so():
    sampled = types.SimpleNamespace(first_stage_model=types.SimpleNamespace(
        regularization=types.SimpleNamespace(sample=True)))
    assert comfy_internals.vae_samples_latent(sampled)
    assert not comfy_internals.vae_samples_latent(types.SimpleNamespace(first_stage_model=object()))
