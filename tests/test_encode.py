"""PNG saves side by side (distributed_core/encode.py): the mechanism on plain Pillow, and what
ComfyUI's own SaveImage and PreviewImage write through it on a real master after a Collector."""
from __future__ import annotations

import io
import json
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from distributed_core import encode  # noqa: E402


@pytest.fixture
def installed(monkeypatch):
    monkeypatch.delenv(encode.DISABLE_VARIABLE, raising=False)
    monkeypatch.setattr(Image.Image, "save", Image.Image.save)  # undone after the test
    assert encode.install()


def noise(seed: int, size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def save_batch(folder: Path, count: int) -> list[Path]:
    paths = []
    for k in range(count):
        info = PngInfo()
        info.add_text("prompt", json.dumps({"k": k}))
        paths.append(folder / f"img_{k:05}_.png")
        noise(k).save(paths[-1], pnginfo=info, compress_level=4)
    return paths


def test_saves_inside_run_at_the_same_time(installed, monkeypatch, tmp_path):
    count = min(4, encode.workers())
    if count < 2:
        pytest.fail("this test needs two usable cores to see saves overlap")
    meeting = threading.Barrier(count, timeout=20)  # broken unless `count` saves are under way at once
    original = encode._save

    def meet_then_save(image, fp, format=None, **params):  # noqa: A002
        meeting.wait()
        return original(image, fp, format, **params)

    monkeypatch.setattr(encode, "_save", meet_then_save)
    paths = encode.deferred_saves(save_batch)(tmp_path, count)
    assert all(path.stat().st_size > 0 for path in paths)


def test_files_are_byte_for_byte_what_a_serial_save_writes(installed, tmp_path):
    (tmp_path / "parallel").mkdir()
    (tmp_path / "serial").mkdir()
    parallel = encode.deferred_saves(save_batch)(tmp_path / "parallel", 6)
    serial = save_batch(tmp_path / "serial", 6)  # outside the wrapper: Pillow's own path
    assert [p.read_bytes() for p in parallel] == [p.read_bytes() for p in serial]


def test_an_encoding_error_reaches_the_caller_after_every_file_is_done(installed, tmp_path):
    def batch_with_a_bad_folder():
        save_batch(tmp_path, 3)
        noise(9).save(tmp_path / "missing" / "x.png")
        return "unreachable result"

    with pytest.raises(FileNotFoundError):
        encode.deferred_saves(batch_with_a_bad_folder)()
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [f"img_{k:05}_.png" for k in range(3)]


def test_other_formats_open_files_and_other_threads_are_left_alone(installed, tmp_path):
    seen: list[str] = []

    def mixed():
        buffer = io.BytesIO()
        noise(1).save(buffer, format="PNG")          # a file object: saved here and now
        seen.append("buffer" if buffer.getvalue() else "")
        noise(2).save(tmp_path / "a.jpg", quality=90)  # not a PNG: saved here and now
        seen.append("jpeg" if (tmp_path / "a.jpg").exists() else "")

    encode.deferred_saves(mixed)()
    assert seen == ["buffer", "jpeg"]
    noise(3).save(tmp_path / "plain.png")  # outside the wrapper: written before save returns
    assert (tmp_path / "plain.png").exists()


def test_wrapping_twice_wraps_once():
    wrapped = encode.deferred_saves(save_batch)
    assert encode.deferred_saves(wrapped) is wrapped


def test_the_variable_keeps_pillows_own_save(monkeypatch):
    monkeypatch.setattr(Image.Image, "save", Image.Image.save)
    monkeypatch.setenv(encode.DISABLE_VARIABLE, "1")
    before = Image.Image.save
    assert not encode.install()
    assert Image.Image.save is before


# --- write-behind: the queue's record of a prompt waits for its files ----------------------------------

class Status(NamedTuple):  # the shape of ComfyUI's PromptQueue.ExecutionStatus
    status_str: str
    completed: bool
    messages: list


class FakeQueue:
    """What the finisher touches of ComfyUI's PromptQueue: task_done and currently_running."""

    def __init__(self):
        self.currently_running = {}
        self.records: list[tuple] = []

    def task_done(self, item_id, outputs, status=None):
        prompt = self.currently_running.pop(item_id)
        self.records.append((prompt[1], outputs, status))


@pytest.fixture
def behind(installed, monkeypatch):
    monkeypatch.setattr(encode, "_finisher", None)
    queue = FakeQueue()
    assert encode.install_finisher(queue)
    yield queue
    assert encode._finisher.drain(30)


def run_prompt(queue: FakeQueue, number: int, prompt_id: str, saves):
    """What ComfyUI's execution thread does for one prompt: run its save node, then task_done."""
    queue.currently_running[number] = (number, prompt_id, {}, {}, [])
    encode.deferred_saves(saves)()
    outputs = {"5": {"images": [prompt_id]}}
    queue.task_done(number, outputs, status=Status("success", True, [["execution_start", {}]]))
    outputs["5"]["images"].append("changed after task_done")  # ComfyUI 2024 reuses this dict


def gated_save(monkeypatch) -> threading.Event:
    """Pillow's encoder held until the returned event is set."""
    gate = threading.Event()
    original = encode._save

    def wait_then_save(image, fp, format=None, **params):  # noqa: A002
        assert gate.wait(30)
        return original(image, fp, format, **params)

    monkeypatch.setattr(encode, "_save", wait_then_save)
    return gate


def test_the_node_returns_with_its_names_taken_and_the_record_waits_for_the_files(behind, monkeypatch, tmp_path):
    gate = gated_save(monkeypatch)
    run_prompt(behind, 1, "a", lambda: save_batch(tmp_path, 3))
    names = [f"img_{k:05}_.png" for k in range(3)]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == names
    assert all((tmp_path / n).stat().st_size == 0 for n in names)  # taken, not yet written
    assert behind.records == [] and 1 in behind.currently_running
    assert encode.finishing("a") and not encode.finishing("b")
    assert len(encode.saving(str(tmp_path / names[0]))) == 1
    gate.set()
    assert encode._finisher.drain(30)
    assert behind.records == [("a", {"5": {"images": ["a"]}}, Status("success", True, [["execution_start", {}]]))]
    (tmp_path / "serial").mkdir()
    assert [(tmp_path / n).read_bytes() for n in names] == [p.read_bytes() for p in save_batch(tmp_path / "serial", 3)]
    assert not list(tmp_path.glob(".*")) and encode.saving(names[0]) == []


def test_records_keep_the_order_the_prompts_ran_in(behind, monkeypatch, tmp_path):
    gate = gated_save(monkeypatch)
    run_prompt(behind, 1, "slow", lambda: save_batch(tmp_path, 1))
    run_prompt(behind, 2, "nothing-saved", lambda: None)  # would be recorded at once if nothing waited
    assert behind.records == []
    gate.set()
    assert encode._finisher.drain(30)
    assert [r[0] for r in behind.records] == ["slow", "nothing-saved"]
    run_prompt(behind, 3, "alone", lambda: None)
    assert [r[0] for r in behind.records][-1] == "alone"  # nothing waits: recorded on the spot


def test_a_file_that_cannot_be_written_fails_the_prompt_and_leaves_no_empty_file(behind, monkeypatch, tmp_path):
    def full_disk(image, fp, format=None, **params):  # noqa: A002
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(encode, "_save", full_disk)
    run_prompt(behind, 1, "a", lambda: save_batch(tmp_path, 2))
    assert encode._finisher.drain(30)
    (prompt_id, _outputs, status), = behind.records
    assert status.status_str == "error" and status.completed is False
    event, data = status.messages[-1]
    assert event == "execution_error" and data["prompt_id"] == "a"
    assert "img_00000_.png" in data["exception_message"] and "No space left" in data["exception_message"]
    assert list(tmp_path.iterdir()) == []


def test_saving_over_a_file_keeps_it_whole_until_the_new_one_is(behind, monkeypatch, tmp_path):
    noise(7).save(tmp_path / "img_00000_.png")  # outside a node: written at once
    before = (tmp_path / "img_00000_.png").read_bytes()
    gate = gated_save(monkeypatch)
    run_prompt(behind, 1, "a", lambda: save_batch(tmp_path, 1))
    assert (tmp_path / "img_00000_.png").read_bytes() == before
    gate.set()
    assert encode._finisher.drain(30)
    assert (tmp_path / "img_00000_.png").read_bytes() != before
    with Image.open(tmp_path / "img_00000_.png") as image:
        assert image.text["prompt"] == json.dumps({"k": 0})


def test_a_queue_of_another_shape_or_the_variable_keeps_saves_inside_the_node(installed, monkeypatch, tmp_path):
    monkeypatch.setattr(encode, "_finisher", None)
    assert not encode.install_finisher(object())
    monkeypatch.setenv(encode.BEHIND_VARIABLE, "0")
    assert not encode.install_finisher(FakeQueue())
    paths = encode.deferred_saves(save_batch)(tmp_path, 2)
    assert all(p.stat().st_size > 0 for p in paths)  # written before the node returned


# --- on a real master -------------------------------------------------------------------------------

def reencoded(path: Path, compress_level: int) -> bytes:
    """What Pillow writes for the file's pixels and text chunks, serially, in this process."""
    with Image.open(path) as image:
        info = PngInfo()
        for key, value in image.text.items():
            info.add_text(key, value)
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG", pnginfo=info, compress_level=compress_level)
    return buffer.getvalue()


@pytest.mark.timeout(300)
def test_savers_after_a_collector_write_what_comfyui_would(live):
    from harness import blue_values, error_of, image_workflow

    prompt = image_workflow(seed=40, batch=3, size=32)
    prompt["6"] = {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}}
    prompt_id = live.master.queue_prompt(prompt)
    entry = live.master.wait_prompt(prompt_id)
    assert error_of(entry) == ""
    saved = entry["outputs"]["5"]["images"]
    first = int(saved[0]["filename"].split("_")[1])  # ComfyUI's counter goes on from earlier tests' files
    assert [item["filename"] for item in saved] == [f"dist_{k:05}_.png" for k in range(first, first + 9)]
    assert blue_values(live.master.saved_images(entry, "5")) == [40] * 3 + [41] * 3 + [42] * 3
    for item in saved:
        path = live.master.dirs["output"] / item["subfolder"] / item["filename"]
        with Image.open(path) as image:
            assert json.loads(image.text["prompt"])["5"]["class_type"] == "SaveImage"
        assert path.read_bytes() == reencoded(path, 4)  # exactly ComfyUI's own file, compress level 4
    previews = entry["outputs"]["6"]["images"]
    assert len(previews) == 9 and all(item["type"] == "temp" for item in previews)
    for item in previews:
        path, = live.master.dirs["temp"].rglob(item["filename"])  # ComfyUI adds a "temp" folder of its own
        assert path.read_bytes() == reencoded(path, 1)  # PreviewImage's level 1
    assert "PNG saves use" in live.master.log_tail(1_000_000)  # the guard found SaveImage in this ComfyUI


def plain_save(prefix: str) -> dict:
    """A prompt without a Collector: an 8x8 image straight into SaveImage, on the master."""
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 255}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}}}


def probe_only(label: str) -> dict:
    """A prompt that writes no image: the probe records when it ran."""
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 7}},
            "2": {"class_type": "DistributedTestProbe", "inputs": {"images": ["1", 0], "seconds_per_image": 0.0,
                                                                   "label": label}},
            "3": {"class_type": "ImageToMask", "inputs": {"image": ["2", 0], "channel": "red"}},
            "4": {"class_type": "DistributedTestSaveValue", "inputs": {"filename": label, "mask": ["3", 0]}}}


@pytest.mark.timeout(300)
def test_the_next_prompt_runs_while_a_file_is_written_and_view_waits_for_it(live):
    from harness import error_of, wait_until

    master = live.master
    prefix = f"behind{time.time_ns()}"
    (live.workdir / "png.json").write_text(json.dumps({str(master.port): 3.0}))  # each PNG takes 3 s more
    first = master.queue_prompt(plain_save(prefix))
    second = master.queue_prompt(probe_only(prefix))
    placeholder = wait_until(lambda: next(iter(master.dirs["output"].glob(f"{prefix}_*.png")), None), 60,
                             interval=0.02, what="the saved file's name")
    assert placeholder.stat().st_size == 0  # its name is taken; the image is still being written
    assert master.get(f"/history/{first}").json() == {}  # not done until the file is
    assert first in [item[1] for item in master.get("/queue").json()["queue_running"]]
    viewed: dict = {}
    viewer = threading.Thread(target=lambda: viewed.update(response=master.get(
        "/view", params={"filename": placeholder.name, "type": "output", "subfolder": ""}, timeout=60)))
    viewer.start()
    recorded_at = wait_until(lambda: master.get(f"/history/{first}").json() and time.time(), 60, interval=0.05,
                             what="the first prompt's history")
    viewer.join(60)
    entry = master.wait_prompt(first)
    assert error_of(entry) == "" and error_of(master.wait_prompt(second)) == ""
    ran, = [r for r in live.probes() if r["label"] == prefix]
    assert ran["started"] < recorded_at - 1.0  # the second prompt ran while the first one's file was written
    response = viewed["response"]
    assert response.status_code == 200
    assert response.content == placeholder.read_bytes() and len(response.content) > 0  # GET /view waited
    with Image.open(io.BytesIO(response.content)) as image:
        assert image.size == (8, 8) and json.loads(image.text["prompt"])["2"]["class_type"] == "SaveImage"
    assert entry["outputs"]["2"]["images"][0]["filename"] == placeholder.name
    assert "written behind the next prompt" in master.log_tail(1_000_000)


@pytest.mark.timeout(300)
def test_an_image_that_cannot_be_written_fails_its_prompt_with_the_file_named(live):
    from harness import error_of

    master = live.master
    prefix = f"nospace{time.time_ns()}"
    (live.workdir / "png.json").write_text(json.dumps({str(master.port): -1}))
    entry = master.wait_prompt(master.queue_prompt(plain_save(prefix)))
    assert f"{prefix}_00001_.png" in error_of(entry) and "No space left on device" in error_of(entry)
    assert list(master.dirs["output"].glob(f"{prefix}_*")) == []  # no empty file left behind
    assert "could not be written" in master.log_tail(1_000_000)
    (live.workdir / "png.json").unlink()
    assert error_of(master.wait_prompt(master.queue_prompt(plain_save(prefix)))) == ""  # the next one is fine
