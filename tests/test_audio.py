"""The audio the Multi-GPU Collector gathers beside its images: the result frame that carries it,
the store that keeps each part beside its images, the order they are joined in, what is refused,
and the prompts the master writes. Pure logic; the same runs on real servers in
test_e2e_collector_audio.py."""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from distributed_core import audio, workflow, wire
from distributed_core.jobs import Job, JobFailed, JobState, JobStore, Share, receive
from harness import image_workflow, split_workflow


def wave(seed: int, samples: int = 5, channels: int = 2, batch: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (batch, channels, samples)).astype(np.float32)


def images(value: float, count: int = 1) -> np.ndarray:
    return np.full((count, 2, 2, 3), value, np.float32)


def token_for(job: Job, *units: int, participant: str = "worker1") -> str:
    share = Share(participant, participant, list(units))
    job.shares[f"{participant}#{len(job.shares)}"] = share
    return share.token


def deliver(store: JobStore, parts: list, cut: int = 0) -> wire.Header:
    data = b"".join(bytes(p) for p in parts)
    data = data[:len(data) - cut]

    async def go():
        reader = asyncio.StreamReader()
        for i in range(0, len(data), 997):
            reader.feed_data(data[i:i + 997])
        reader.feed_eof()
        return await receive(store, reader, len(data))
    return asyncio.run(go())


# --- the frame ------------------------------------------------------------------------------------

@pytest.mark.parametrize("transport", ["float32", "uint8", "png"])
def test_a_frame_carries_its_audio_exactly_after_the_images(transport):
    waveform = wave(3, samples=4801)
    parts = wire.frame("j", "4", 2, 1, "tok", images(0.5), transport, (waveform, 24000))
    data = b"".join(bytes(p) for p in parts)
    header = wire.parse_header(data[wire.PREFIX_SIZE:wire.PREFIX_SIZE + wire.header_length(data[:wire.PREFIX_SIZE])])
    assert header.audio == (24000, (1, 2, 4801))
    assert header.audio_size == 1 * 2 * 4801 * 4
    assert len(data) == wire.PREFIX_SIZE + len(header.to_bytes()) - wire.PREFIX_SIZE + header.payload_size
    assert np.array_equal(np.frombuffer(data[-header.audio_size:], np.float32).reshape(1, 2, 4801), waveform)
    if transport == "float32":
        _h, back, sound = wire.decode(data, with_audio=True)
        assert np.array_equal(back, images(0.5)) and np.array_equal(sound, waveform)


def test_a_frame_without_audio_is_what_earlier_versions_sent():
    parts = wire.frame("j", "4", 1, 1, "tok", images(0.25), "float32")
    raw = json.loads(bytes(parts[0])[wire.PREFIX_SIZE:])
    assert "audio" not in raw and len(parts) == 2
    header, back = wire.decode(b"".join(bytes(p) for p in parts))
    assert header.audio is None and header.payload_size == header.raw_size
    # and a header written without the key (an earlier version's) reads as a frame without audio
    del raw["nbytes"]
    assert wire.parse_header(json.dumps(raw).encode()).audio is None


def test_a_frame_with_audio_is_not_decoded_without_it():
    data = b"".join(bytes(p) for p in wire.frame("j", "4", 1, 1, "t", images(0), "float32", (wave(1), 8000)))
    with pytest.raises(wire.FrameError, match="carries audio"):
        wire.decode(data)


@pytest.mark.parametrize("audio_field, words", [
    ("x", "object"), ({"sample_rate": 0, "shape": [1, 2, 3]}, "sample_rate"),
    ({"sample_rate": True, "shape": [1, 2, 3]}, "sample_rate"), ({"sample_rate": 24000, "shape": [1, 2]}, "shape"),
    ({"sample_rate": 24000, "shape": [0, 2, 3]}, "range"), ({"sample_rate": 24000, "shape": [1, 65, 3]}, "range"),
    ({"sample_rate": 24000, "shape": [1, 2, -1]}, "range"), ({"sample_rate": 24000}, "shape"),
    ({"sample_rate": 24000, "shape": [1, 2, 3.5]}, "shape"),
])
def test_a_malformed_audio_header_is_refused(audio_field, words):
    raw = json.loads(wire.Header("j", "4", 1, "t", "float32", (1, 2, 2, 3)).to_bytes()[wire.PREFIX_SIZE:])
    with pytest.raises(wire.FrameError, match=words):
        wire.parse_header(json.dumps({**raw, "audio": audio_field}).encode())


def test_a_waveform_that_does_not_match_its_header_is_refused():
    header = wire.Header("j", "4", 1, "t", "float32", (1, 2, 2, 3), audio=(24000, (1, 2, 5)))
    with pytest.raises(wire.FrameError, match="waveform"):
        wire.encode(header, images(0), (wave(1, samples=6), 24000))
    with pytest.raises(wire.FrameError, match="declares audio"):
        wire.encode(header, images(0))
    with pytest.raises(wire.FrameError, match="batch, channels, samples"):
        wire.frame("j", "4", 1, 1, "t", images(0), "float32", (np.zeros((2, 5), np.float32), 24000))


# --- joining ----------------------------------------------------------------------------------------

def test_parts_are_joined_along_time_in_the_order_given():
    parts = [audio.sound(wave(s, samples=3 + s), 24000, f"p{s}") for s in (0, 1, 2)]
    joined = audio.join(parts)
    assert joined.sample_rate == 24000 and joined.waveform.shape == (1, 2, 3 + 4 + 5)
    assert np.array_equal(joined.waveform, np.concatenate([wave(0, 3), wave(1, 4), wave(2, 5)], axis=2))
    # a batch of two tracks stays two tracks, each joined in time
    two = audio.join([audio.sound(wave(s, batch=2), 8000) for s in (4, 5)])
    assert two.waveform.shape == (2, 2, 10) and np.array_equal(two.waveform[1, :, 5:], wave(5, batch=2)[1])


@pytest.mark.parametrize("other, words", [
    (audio.sound(wave(1), 24001, "worker1 (unit 1)"), "sample rates"),
    (audio.sound(wave(1, channels=1), 24000, "worker1 (unit 1)"), "channel counts"),
    (audio.sound(wave(1, batch=2), 24000, "worker1 (unit 1)"), "batch sizes"),
])
def test_parts_that_cannot_be_joined_name_who_sent_what_and_the_remedy(other, words):
    parts = [audio.sound(wave(0), 24000, "master (unit 0)"), other, audio.sound(wave(2), 24000, "worker2 (unit 2)")]
    with pytest.raises(audio.AudioError) as info:
        audio.join(parts)
    message = str(info.value)
    assert words in message and "master (unit 0), worker2 (unit 2)" in message and "worker1 (unit 1)" in message
    assert "same sample rate" in message and "before the Collector" in message


def test_what_is_not_audio_is_refused_clearly():
    with pytest.raises(audio.AudioError, match=r"\[batch, channels, samples\]"):
        audio.sound(np.zeros((2, 5), np.float32), 24000)
    with pytest.raises(audio.AudioError, match="whole number"):
        audio.sound(wave(0), 0)
    with pytest.raises(audio.AudioError, match="whole number"):
        audio.sound(wave(0), 24000.5)
    with pytest.raises(audio.AudioError, match="float"):
        audio.sound(np.zeros((1, 2, 5), np.int16), 24000)
    with pytest.raises(audio.AudioError, match="no audio"):
        audio.join([])


def test_one_audio_value_goes_with_every_part_as_one_image_batch_does():
    assert audio.per_part(["a"], 3) == ["a", "a", "a"]
    assert audio.per_part(["a", "b"], 2) == ["a", "b"]
    with pytest.raises(audio.AudioError, match="2 audio values for 3"):
        audio.per_part(["a", "b"], 3)


# --- the store ----------------------------------------------------------------------------------

def audio_job(units=(0, 1, 2), split=False, with_audio=True) -> tuple[JobStore, Job]:
    store = JobStore()
    job = Job(id="j", collectors=["4"], units=list(units), split=split, audio={"4"} if with_audio else set())
    store.add(job)
    return store, job


def test_audio_parts_come_back_in_image_order_whatever_the_arrival_order():
    store, job = audio_job()
    tokens = {u: token_for(job, u, participant=f"worker{u}") for u in (1, 2)}
    store.put_local("j", "4", 0, 1, images(0.0), audio.sound(wave(0), 24000))
    for unit in (2, 1):  # the last worker first
        deliver(store, wire.frame("j", "4", unit, 1, tokens[unit], images(unit / 10), "uint8", (wave(unit), 24000)))
    assert store.wait("j", "4", 0) == (3, True)
    sounds = store.take_sounds("j", "4")
    parts = store.take("j", "4")
    assert [s.source for s in sounds] == ["master (unit 0)", "worker1 (unit 1)", "worker2 (unit 2)"]
    assert np.array_equal(audio.join(sounds).waveform, np.concatenate([wave(0), wave(1), wave(2)], axis=2))
    assert len(parts) == 1 and np.allclose(parts[0][:, 0, 0, 0], [0.0, 0.1, 0.2], atol=0.5 / 255)
    assert store.get("j").held_bytes == 0


def test_split_chunks_bring_their_audio_in_global_order():
    store, job = audio_job(units=range(6), split=True)
    store.put_local("j", "4", 0, 2, images(0, 2), audio.sound(wave(0, samples=2), 8000))
    deliver(store, wire.frame("j", "4", 4, 2, token_for(job, 4, 5), images(1, 2), "float32", (wave(4, samples=2), 8000)))
    deliver(store, wire.frame("j", "4", 2, 2, token_for(job, 2, 3, participant="w2"), images(0.5, 2), "png",
                              (wave(2, samples=2), 8000)))
    sounds = store.take_sounds("j", "4")
    assert [s.source for s in sounds] == ["master (units 0-1)", "w2 (units 2-3)", "worker1 (units 4-5)"]
    assert np.array_equal(audio.join(sounds).waveform, np.concatenate([wave(0, 2), wave(2, 2), wave(4, 2)], axis=2))


def test_a_unit_given_again_after_a_failure_is_kept_once_with_its_audio():
    store, job = audio_job(units=(0, 1))
    first = token_for(job, 1, participant="worker1")
    job.shares["worker1#0"].state = "failed"
    retry = token_for(job, 1, participant="worker2")
    store.put_local("j", "4", 0, 1, images(0), audio.sound(wave(0), 24000))
    deliver(store, wire.frame("j", "4", 1, 1, retry, images(1), "float32", (wave(11), 24000)))
    with pytest.raises(wire.Rejected) as info:  # the failed worker delivers late: not doubled
        deliver(store, wire.frame("j", "4", 1, 1, first, images(1), "float32", (wave(99), 24000)))
    assert info.value.status == 409
    sounds = store.take_sounds("j", "4")
    assert [s.source for s in sounds] == ["master (unit 0)", "worker2 (unit 1)"]
    assert np.array_equal(sounds[1].waveform, wave(11))


def test_frames_with_and_without_audio_are_never_mixed():
    store, job = audio_job(units=(0, 1))
    token = token_for(job, 1)
    with pytest.raises(wire.Rejected) as info:  # a worker of an earlier version sends images alone
        deliver(store, wire.frame("j", "4", 1, 1, token, images(1), "float32"))
    assert info.value.status == 400 and "gathers audio" in info.value.message and "worker1" in info.value.message
    assert store.get("j").delivered("4") == 0 and not store.get("j").inflight
    with pytest.raises(JobFailed, match="gathers audio in this job but the master"):
        store.put_local("j", "4", 0, 1, images(0))
    plain, job = audio_job(units=(0, 1), with_audio=False)
    with pytest.raises(wire.Rejected) as info:
        deliver(plain, wire.frame("j", "4", 1, 1, token_for(job, 1), images(1), "float32", (wave(1), 24000)))
    assert info.value.status == 400 and "not connected" in info.value.message
    with pytest.raises(JobFailed, match="not connected"):
        plain.put_local("j", "4", 0, 1, images(0), audio.sound(wave(0), 24000))
    assert plain.take_sounds("j", "4") is None


def test_a_truncated_waveform_is_refused_and_leaves_nothing_behind():
    store, job = audio_job(units=(0, 1))
    token = token_for(job, 1)
    parts = wire.frame("j", "4", 1, 1, token, images(1), "float32", (wave(1, samples=100), 24000))
    with pytest.raises(wire.Rejected) as info:
        deliver(store, parts, cut=8)
    assert info.value.status == 400
    assert store.get("j").delivered("4") == 0 and not store.get("j").sounds
    deliver(store, parts)
    assert store.get("j").delivered("4") == 1


def test_audio_counts_against_the_result_budget():
    store = JobStore(budget_bytes=1000)
    older = Job(id="a", collectors=["4"], units=[0, 1], audio={"4"})
    later = Job(id="b", collectors=["4"], units=[0, 1], audio={"4"})
    store.add(older)
    store.add(later)
    header = wire.Header("b", "4", 1, token_for(later, 1), "float32", (1, 2, 2, 3), audio=(8000, (1, 2, 200)))
    with pytest.raises(wire.Rejected) as info:  # 1600 bytes of audio for a job that is not the oldest
        store.reserve(header)
    assert info.value.status == 503


# --- Collector jobs: a mismatch fails the job ---------------------------------------------------------

def test_audio_that_cannot_be_joined_fails_the_job_with_the_reason():
    from runtimes import make_runtime
    store, job = audio_job(units=(0, 1))
    jobs = make_runtime(None, None, store=store, load=lambda: None).collectors
    store.put_local("j", "4", 0, 1, images(0), audio.sound(wave(0), 24000))
    deliver(store, wire.frame("j", "4", 1, 1, token_for(job, 1), images(1), "float32", (wave(1), 44100)))
    with pytest.raises(JobFailed) as info:
        jobs.collected("j", "4")
    message = str(info.value)
    assert "sample rates" in message and "24000 Hz" in message and "44100 Hz" in message
    assert "worker1 (unit 1)" in message and "master (unit 0)" in message
    assert store.get("j") is None and store.recent()[0]["state"] == JobState.FAILED.value
    assert store.recent()[0]["error"] == message


def test_collected_hands_over_images_and_audio_together():
    from runtimes import make_runtime
    store, job = audio_job(units=(0, 1))
    jobs = make_runtime(None, None, store=store, load=lambda: None).collectors
    store.put_local("j", "4", 0, 1, images(0), audio.sound(wave(0), 24000))
    deliver(store, wire.frame("j", "4", 1, 1, token_for(job, 1), images(1), "float32", (wave(1), 24000)))
    parts, sounds, _notices = jobs.collected("j", "4")
    assert len(parts) == 1 and [s.source for s in sounds] == ["master (unit 0)", "worker1 (unit 1)"]
    assert store.recent()[0]["state"] == "done"


# --- prompts ----------------------------------------------------------------------------------------

def with_audio(prompt: dict, collector: str = "4", source: str = "seed") -> dict:
    prompt = json.loads(json.dumps(prompt))
    audio_inputs = {"seed": 7, "samples": 16}
    if source == "seed":
        audio_inputs["seed"] = ["1", 0]
    elif source == "latent":
        audio_inputs["latent"] = ["1", 0]
    prompt["20"] = {"class_type": "DistributedTestAudio", "inputs": audio_inputs}
    prompt[collector]["inputs"]["audio"] = ["20", 0]
    prompt["21"] = {"class_type": "DistributedTestSaveValue", "inputs": {"filename": "a", "audio": [collector, 1]}}
    return prompt


def test_the_worker_prompt_keeps_what_the_audio_needs():
    prompt = with_audio(image_workflow(seed=5, batch=1))
    worker = workflow.worker_prompt(prompt, ["4"], {"job": "j"}, [[1, 1]], [1])
    assert set(worker) == {"1", "2", "3", "4", "20"}
    assert worker["4"]["inputs"]["audio"] == ["20", 0]
    assert json.loads(worker["1"]["inputs"]["_distributed"]) == {"units": [1]}


def test_a_master_without_a_share_gathers_audio_without_rendering_it():
    prompt = with_audio(image_workflow(seed=5, batch=1))
    idle = workflow.master_prompt(prompt, ["4"], {"job": "j"}, [], [])
    assert "audio" not in idle["4"]["inputs"] and "20" not in idle and idle["21"]["inputs"]["audio"] == ["4", 1]
    busy = workflow.master_prompt(prompt, ["4"], {"job": "j"}, [[0, 1]], [0])
    assert busy["4"]["inputs"]["audio"] == ["20", 0] and "20" in busy
    assert workflow.takes_audio(prompt, "4") and not workflow.takes_audio(image_workflow(), "4")


def test_an_audio_output_without_an_audio_input_is_refused_before_anything_renders():
    prompt = with_audio(image_workflow(seed=5, batch=1))
    del prompt["4"]["inputs"]["audio"]
    with pytest.raises(workflow.WorkflowError) as info:
        workflow.check_audio(prompt, ["4"], ["4"], split=False)
    assert "DistributedTestSaveValue (node 21)" in str(info.value) and "audio input" in str(info.value)
    del prompt["21"]
    workflow.check_audio(prompt, ["4"], ["4"], split=False)  # nothing uses it: fine


def test_split_mode_audio_must_come_from_the_split_batch():
    prompt = with_audio(split_workflow(batch=4), source="latent")
    workflow.check_audio(prompt, ["4"], ["4"], split=True)
    fixed = with_audio(split_workflow(batch=4), source="none")
    with pytest.raises(workflow.WorkflowError, match="Distributed Empty Latent"):
        workflow.check_audio(fixed, ["4"], ["4"], split=True)
    workflow.check_audio(with_audio(image_workflow(), source="none"), ["4"], ["4"], split=False)  # multiply: fine


def test_the_prompt_hook_refuses_such_prompts_and_plans_audio_jobs(tmp_path):
    from distributed_core import config as config_file
    from runtimes import make_runtime, submit as submit_to
    config = config_file.parse({"master": {"port": 18188}, "workers": [{"id": "w1", "port": 18189}]})
    runtime = make_runtime(config, tmp_path)
    jobs = runtime.collectors

    def submit(prompt):
        _data, pending, refusals = submit_to(runtime, prompt)
        return pending, refusals
    (job_id,), refusals = submit(with_audio(image_workflow(seed=5, batch=1)))
    assert not refusals and jobs.store.get(job_id).audio == {"4"}
    (plain,), _ = submit(image_workflow(seed=5, batch=1))
    assert jobs.store.get(plain).audio == set()
    pending, refusals = submit(with_audio(split_workflow(batch=4), source="none"))
    assert not pending and "Distributed Empty Latent" in refusals[0]
