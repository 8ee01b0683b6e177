"""The spread queue's pure logic: how a prompt is cut, the order and rules of claims, the stand-in
for ComfyUI's queue get, and value frames for every type output nodes take."""
from __future__ import annotations

import copy
import json
import heapq
import json
import threading

import numpy as np
import pytest
import torch

from distributed_core import comfy_internals, spread, spread_queue, wire
from distributed_core.plan import MASTER_ID

TYPES = {("EmptyImage", 0): "IMAGE", ("KSampler", 0): "LATENT", ("VAEDecode", 0): "IMAGE",
         ("CheckpointLoaderSimple", 0): "MODEL", ("LoadAudio", 0): "AUDIO", ("ImageToMask", 0): "MASK"}


def return_type(class_type, index):
    return TYPES.get((class_type, index))


def txt2img() -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x"}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 1}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "a"}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0]}},
    }


# --- cutting a prompt ----------------------------------------------------------------------------------

def test_split_finds_what_the_output_nodes_take():
    cut = spread.split(txt2img(), ["7", "8", "9"], return_type)
    assert cut == spread.Split(("7", "8", "9"), (("5", 0, "LATENT"), ("6", 0, "IMAGE")))


def test_master_prompt_replaces_sources_under_their_ids_and_keeps_the_rest():
    prompt = txt2img()
    cut = spread.split(prompt, ["7", "8"], return_type)
    run = cut.master_prompt(prompt, "pid")
    assert run["6"]["class_type"] == spread.RECEIVER
    assert spread.read_field(run, "6") == {"spread": "pid", "node": "6", "outputs": [0]}
    assert run["7"] == prompt["7"] and run["1"] == prompt["1"]  # kept: ComfyUI keeps their cache
    assert prompt["6"]["class_type"] == "VAEDecode"             # the submitted prompt is untouched


def test_worker_prompt_holds_the_upstream_and_a_sender():
    prompt = txt2img()
    cut = spread.split(prompt, ["7", "9"], return_type)
    sent = cut.worker_prompt(prompt, {"spread": "pid", "token": "t"})
    assert set(sent) == {"1", "5", "6", spread.SENDER_ID}
    sender = sent[spread.SENDER_ID]
    assert sender["class_type"] == spread.SENDER
    assert sender["inputs"]["v0"] == ["5", 0] and sender["inputs"]["v1"] == ["6", 0]
    assert spread.read_field(sent, spread.SENDER_ID)["slots"] == [["5", 0, "LATENT"], ["6", 0, "IMAGE"]]


@pytest.mark.parametrize("prompt, outputs, reason", [
    ({"1": {"class_type": "MultiGPUCollector", "inputs": {}},
      "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}}, ["2"], "Collector"),
    ({"1": {"class_type": "CheckpointLoaderSimple", "inputs": {}},
      "2": {"class_type": "SaveModel", "inputs": {"model": ["1", 0]}}}, ["2"], "MODEL"),
    ({"1": {"class_type": "DistributedTiledUpscale", "inputs": {}},
      "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}}, ["2"], "Tiled Upscale"),
    ({"2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x"}}}, ["2"], "nothing"),
    ({"2": {"class_type": "SaveImage", "inputs": {}}}, [], "no output"),
    ({"1": {"class_type": "EmptyImage", "inputs": {}},
      "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}},
      "3": {"class_type": "Blur", "inputs": {"images": ["2", 0]}},
      "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0]}}}, ["2", "4"], "feeds"),
])
def test_split_refuses_what_cannot_spread(prompt, outputs, reason):
    found = spread.split(prompt, outputs, lambda c, i: {"Blur": "IMAGE"}.get(c) or return_type(c, i))
    assert isinstance(found, str) and reason in found


# --- claims -----------------------------------------------------------------------------------------

def item(n: int, pid: str | None = None, prompt: dict | None = None, outputs=("7",)):
    return (float(n), pid or f"p{n}", prompt or txt2img(), {}, list(outputs))


def planner(it):
    return spread.split_item(it, return_type)


def test_workers_claim_the_oldest_unclaimed_in_submission_order():
    state = spread_queue.SpreadState()
    items = [item(3), item(1), item(2)]
    first = state.pick_for_worker(items, "w1", "w1", planner)
    second = state.pick_for_worker(items, "w2", "w2", planner)
    assert (first[0].prompt_id, second[0].prompt_id) == ("p1", "p2")
    assert state.busy() == {"w1", "w2"}


def test_master_skips_prompts_workers_render_and_takes_the_next_unclaimed():
    state = spread_queue.SpreadState()
    items = [item(1), item(2)]
    state.pick_for_worker(items, "w1", "w1", planner)
    queued, run = state.pick_for_master(items, lambda: True, planner)
    assert queued[1] == "p2" and run is None                       # rendered as submitted
    assert state.claims["p2"].participant == MASTER_ID
    assert state.pick_for_master(items[:1], lambda: True, planner) is None  # p1 is on a worker


def test_master_disabled_leaves_spread_prompts_to_workers_but_runs_plain_ones():
    state = spread_queue.SpreadState()
    plain = item(2, prompt={"1": {"class_type": "MultiGPUCollector", "inputs": {}},
                            "7": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}})
    assert state.pick_for_master([item(1), plain], lambda: False, planner)[0] is plain


def test_arrived_values_hand_the_master_the_receiver_version_and_restore_the_prompt():
    state = spread_queue.SpreadState()
    items = [item(1)]
    claim, queued, _cut = state.pick_for_worker(items, "w1", "w1", planner)
    state.arrive("p1", claim.token, {"6": {0: ["image"]}})
    picked, run = state.pick_for_master(items, lambda: False, planner)
    assert picked is queued and run["6"]["class_type"] == spread.RECEIVER
    assert queued[2]["6"]["class_type"] != spread.RECEIVER  # the queued item is left as it is
    state.swapped(run, queued[2])
    assert state.original_prompt(run) is queued[2]
    assert state.original_prompt(dict(run)) is not queued[2]  # by identity only
    assert state.take_values("p1", "6") == {0: ["image"]}


def test_frames_need_the_claims_token_and_a_claim_that_waits():
    state = spread_queue.SpreadState()
    claim, _queued, _cut = state.pick_for_worker([item(1)], "w1", "w1", planner)
    for forged in ("forged", "\ud800abc"):
        with pytest.raises(PermissionError):
            state.check("p1", forged)
    with pytest.raises(LookupError):
        state.check("p9", claim.token)
    state.arrive("p1", claim.token, {})
    with pytest.raises(ValueError):
        state.arrive("p1", claim.token, {})  # delivered once


def test_a_failed_worker_puts_the_prompt_back_and_does_not_take_it_again():
    state = spread_queue.SpreadState()
    items = [item(1)]
    state.pick_for_worker(items, "w1", "w1", planner)
    assert state.requeue("p1", "w1", "gone")
    assert state.pick_for_worker(items, "w1", "w1", planner) is None
    assert state.pick_for_worker(items, "w2", "w2", planner)[0].participant == "w2"
    assert not state.requeue("p1", "w1", "late")  # w2 holds it now


def test_a_worker_error_fails_the_masters_run_with_its_message():
    state = spread_queue.SpreadState()
    items = [item(1)]
    state.pick_for_worker(items, "w1", "w1", planner)
    state.fail("p1", "worker1: error in node 5 (KSampler): out of ink")
    state.pick_for_master(items, lambda: False, planner)
    with pytest.raises(RuntimeError, match="out of ink"):
        state.take_values("p1", "6")


def test_prune_withdraws_deleted_prompts_that_a_worker_renders():
    state = spread_queue.SpreadState()
    items = [item(1), item(2)]
    state.pick_for_worker(items, "w1", "w1", planner)
    state.pick_for_master(items, lambda: True, planner)
    withdrawn = state.prune({"p2"})
    assert [c.prompt_id for c in withdrawn] == ["p1"]
    assert set(state.claims) == {"p2"}


# --- the stand-in for PromptQueue.get ---------------------------------------------------------------

class FakeServer:
    def __init__(self):
        self.updates = 0

    def queue_updated(self):
        self.updates += 1


class FakeQueue:
    """The attributes of ComfyUI's PromptQueue that the tap uses (same in 2024-03 and 0.3.64)."""

    def __init__(self):
        self.server = FakeServer()
        self.mutex = threading.RLock()
        self.not_empty = threading.Condition(self.mutex)
        self.task_counter = 0
        self.queue = []
        self.currently_running = {}
        self.flags = {}

    def put(self, it):
        with self.mutex:
            heapq.heappush(self.queue, it)
            self.not_empty.notify()

    def get(self, timeout=None):
        raise AssertionError("replaced by the tap")


def make_tap(active=True, master=True):
    q = FakeQueue()
    assert comfy_internals.queue_problem(q) == ""
    state = spread_queue.SpreadState(lock=q.not_empty)
    tap = comfy_internals.QueueTap(q, lambda items: state.pick_for_master(items, lambda: master, planner),
                                   lambda: active, on_swap=state.swapped)
    tap.install()
    return q, state, tap


def test_tap_off_behaves_as_comfyuis_get():
    q, _state, _tap = make_tap(active=False)
    for n in (3, 1, 2):
        q.put(item(n))
    got = [q.get(timeout=0.1)[0][1] for _ in range(3)]
    assert got == ["p1", "p2", "p3"]
    assert sorted(x[1] for x in q.currently_running.values()) == ["p1", "p2", "p3"]
    assert q.task_counter == 3 and q.get(timeout=0.05) is None


def test_tap_never_blocks_on_a_prompt_a_worker_renders():
    q, state, _tap = make_tap(master=True)
    q.put(item(1))
    q.put(item(2))
    state.pick_for_worker(list(q.queue), "w1", "w1", planner)
    (run, number) = q.get(timeout=0.5)
    assert run[1] == "p2" and [x[1] for x in q.queue] == ["p1"]
    assert q.get(timeout=0.05) is None


@pytest.mark.parametrize("fields", [5, 6])
def test_tap_hands_over_comfyuis_own_item_with_the_receiver_version_and_records_the_submitted_one(fields):
    """ComfyUI 0.38 queues six fields (the last: sensitive data) and its prompt worker reads
    item[5]: the item the tap returns is the very one queued, whatever its length."""
    q, state, _tap = make_tap(master=False)
    queued = item(1) + (({"api_key": "secret"},) if fields == 6 else ())
    submitted = json.loads(json.dumps(queued[2]))
    q.put(queued)
    claim, _queued, _cut = state.pick_for_worker(list(q.queue), "w1", "w1", planner)
    got = []
    thread = threading.Thread(target=lambda: got.append(q.get(timeout=5)))
    thread.start()
    state.arrive("p1", claim.token, {"6": {0: [1]}})
    thread.join(5)
    (run, number), = got
    assert run is queued and len(run) == fields
    assert run[2]["6"]["class_type"] == spread.RECEIVER
    recorded = q.currently_running[number]
    assert recorded[2] == submitted and len(recorded) == fields  # what the history keeps
    assert state.original_prompt(run[2]) is recorded[2]      # what output nodes embed


def test_a_queue_item_of_another_shape_is_run_as_submitted():
    assert spread.split_item(("p1", {}), return_type) == "its queue item is not shaped as this extension knows"


def test_queue_problem_names_what_is_missing():
    assert "task_counter" in comfy_internals.queue_problem(object()) or "mutex" in comfy_internals.queue_problem(object())


# --- values on the wire --------------------------------------------------------------------------------

def round_trip(values: list):
    parts = spread.encode_values("pid", "tok", [["6", 0, "X"]], {"v0": values})
    frame = b"".join(bytes(p) for p in parts)
    header, arrays = wire.decode_values(frame)
    assert (header.prompt, header.token) == ("pid", "tok")
    return spread.decode_values(header.tree, arrays)["6"][0]


def same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.view(torch.int16) if a.dtype == torch.bfloat16 else a,
                           b.view(torch.int16) if b.dtype == torch.bfloat16 else b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("kind", ["IMAGE", "MASK", "LATENT", "AUDIO", "bfloat16", "plain", "empty"])
def test_values_round_trip_exactly(kind):
    g = torch.Generator().manual_seed(3)
    values = {
        "IMAGE": [torch.rand([2, 16, 24, 3], generator=g), torch.rand([1, 16, 24, 4], generator=g)],
        "MASK": [torch.rand([1, 16, 24], generator=g), torch.rand([16, 24], generator=g)],
        "LATENT": [{"samples": torch.randn([2, 4, 8, 8], generator=g), "batch_index": [4, 5],
                    "noise_mask": torch.rand([2, 1, 64, 64], generator=g)},
                   {"samples": torch.randn([1, 16, 3, 8, 8], generator=g).half()}],
        "AUDIO": [{"waveform": torch.rand([1, 2, 4800], generator=g) * 2 - 1, "sample_rate": 44100}],
        "bfloat16": [torch.randn([3, 5], generator=g).to(torch.bfloat16)],
        "plain": [1, 2.5, "text", True, None, (1, "a"), {"k": [1, 2]}],
        "empty": [torch.zeros([0, 8, 8, 3])],
    }[kind]
    same(values, round_trip(values))


def test_what_is_not_data_does_not_travel():
    with pytest.raises(TypeError, match="cannot travel"):
        round_trip([object()])
    with pytest.raises(TypeError, match="cannot travel"):
        round_trip([torch.zeros(2, dtype=torch.complex64)])


def test_value_frames_refuse_what_is_malformed():
    parts = spread.encode_values("pid", "tok", [["6", 0, "X"]], {"v0": [torch.ones(4)]})
    frame = b"".join(bytes(p) for p in parts)
    with pytest.raises(wire.FrameError):
        wire.decode_values(frame[:-1])
    with pytest.raises(wire.FrameError):
        wire.decode_values(b"CDR1" + frame[4:])
    bad = wire.ValueHeader("pid", "tok", {"a": 5}, (("float32", (4,)),)).to_bytes() + bytes(16)
    header, arrays = wire.decode_values(bad)
    with pytest.raises(wire.FrameError):
        spread.decode_values(header.tree, arrays)
    with pytest.raises(wire.FrameError):
        wire.parse_value_header(b'{"prompt":"p","token":"t","tree":null,"arrays":[["complex",[1]]]}')
    for key in ("prompt", "token"):
        with pytest.raises(wire.FrameError, match="lone surrogate"):
            wire.parse_value_header(json.dumps({"prompt": "p", "token": "t", "tree": None, "arrays": [],
                                                key: "\ud800abc"}).encode())
