"""PNG saves side by side (distributed_core/encode.py): the mechanism on plain Pillow, and what
ComfyUI's own SaveImage and PreviewImage write through it on a real master after a Collector."""
from __future__ import annotations

import io
import json
import sys
import threading
import time
from pathlib import Path

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


def smooth(width: int, height: int, channels: int = 3) -> np.ndarray:
    """A picture with gradients and noise, as an upscale gives: what the Paeth filter is for."""
    rng = np.random.default_rng(width + channels)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 255 // max(1, width - 1)), (y * 255 // max(1, height - 1)), (x + y) % 256][:channels]
                    + [np.full_like(x, 200)] * (channels - 3), axis=-1)
    return np.clip(base + rng.integers(-3, 4, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("mode,channels", [("RGB", 3), ("RGBA", 4)])
def test_a_large_image_is_encoded_in_strips_to_the_same_pixels_and_text(installed, tmp_path, mode, channels):
    pixels = smooth(1531, 1377, channels)  # above STRIP_PIXELS, rows not a multiple of the strip
    assert pixels.shape[0] * pixels.shape[1] >= encode.STRIP_PIXELS and pixels.shape[0] % encode.STRIP_ROWS
    info = PngInfo()
    info.add_text("prompt", json.dumps({"3": {"class_type": "KSampler"}}))
    info.add_text("workflow", "{}")
    image = Image.fromarray(pixels, mode)
    assert encode._in_strips(image, {"pnginfo": info, "compress_level": 4})
    path = tmp_path / "big_00001_.png"
    encode.deferred_saves(lambda: image.save(path, pnginfo=info, compress_level=4))()
    with Image.open(path) as back:
        back.load()
        assert back.mode == mode and back.text == {"prompt": '{"3": {"class_type": "KSampler"}}', "workflow": "{}"}
        assert np.array_equal(np.asarray(back), pixels)
    serial = io.BytesIO()
    encode._save(image, serial, "PNG", pnginfo=info, compress_level=4)
    assert path.read_bytes() != serial.getvalue()  # the strip encoder wrote it, not Pillow
    assert len(path.read_bytes()) < 1.25 * len(serial.getvalue())  # at most a little larger (one filter)


def test_images_the_strips_do_not_cover_go_to_pillow(installed):
    small = Image.fromarray(smooth(64, 64))
    big = Image.fromarray(smooth(1600, 1400))
    assert not encode._in_strips(small, {"compress_level": 4})
    assert not encode._in_strips(big.convert("L"), {"compress_level": 4})
    assert not encode._in_strips(big, {"compress_level": 4, "optimize": True})
    big.info["icc_profile"] = b"profile"
    assert not encode._in_strips(big, {"compress_level": 4})


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


def test_the_variable_keeps_saves_one_at_a_time_on_the_nodes_thread(monkeypatch, tmp_path):
    monkeypatch.setattr(Image.Image, "save", Image.Image.save)
    monkeypatch.setenv(encode.DISABLE_VARIABLE, "1")
    assert not encode.install()
    threads = []
    original = encode._save

    def noted(image, fp, format=None, **params):  # noqa: A002
        threads.append(threading.current_thread())
        return original(image, fp, format, **params)

    monkeypatch.setattr(encode, "_save", noted)
    paths = encode.deferred_saves(save_batch)(tmp_path, 3)
    assert threads == [threading.current_thread()] * 3
    assert [json.loads(Image.open(p).info["prompt"])["k"] for p in paths] == [0, 1, 2]


@pytest.mark.parametrize("serial", ["", "1"])
def test_each_image_of_a_call_gets_its_own_text_entries(installed, monkeypatch, tmp_path, serial):
    """What a Save Image after a Collector writes: the node's metadata with each image's own
    prompt and workflow (provenance.texts), the other entries kept, in parallel or serially."""
    monkeypatch.setenv(encode.DISABLE_VARIABLE, serial)

    def save_with_workflow(folder: Path, count: int) -> list[Path]:
        paths = []
        for k in range(count):
            info = PngInfo()
            info.add_text("prompt", json.dumps({"k": "queued"}))
            info.add_text("workflow", json.dumps({"w": "queued"}))
            info.add_text("other", "kept")
            paths.append(folder / f"img_{k:05}_.png")
            noise(k).save(paths[-1], pnginfo=info, compress_level=1)
        return paths

    given = [{"prompt": json.dumps({"k": k}), "workflow": json.dumps({"w": k}), "distributed": f"p{k}"}
             for k in range(3)]
    paths = encode.deferred_saves(save_with_workflow, lambda args, kwargs: given)(tmp_path, 3)
    for k, path in enumerate(paths):
        info = Image.open(path).info
        assert json.loads(info["prompt"]) == {"k": k} and json.loads(info["workflow"]) == {"w": k}
        assert info["other"] == "kept" and info["distributed"] == f"p{k}"
        assert list(info)[:3] == ["prompt", "workflow", "other"]  # each in its place
    (tmp_path / "plain").mkdir()
    plain = encode.deferred_saves(save_with_workflow, lambda args, kwargs: None)(tmp_path / "plain", 1)
    assert json.loads(Image.open(plain[0]).info["prompt"]) == {"k": "queued"}


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


@pytest.mark.timeout(300)
def test_an_image_that_cannot_be_written_fails_its_prompt_with_the_file_named(live):
    from harness import error_of

    master = live.master
    prefix = f"nospace{time.time_ns()}"
    (live.workdir / "png.json").write_text(json.dumps({str(master.port): -1}))
    entry = master.wait_prompt(master.queue_prompt(plain_save(prefix)))
    assert f"could not write {prefix}_00001_.png" in error_of(entry) and "No space left on device" in error_of(entry)
    (live.workdir / "png.json").unlink()
    assert error_of(master.wait_prompt(master.queue_prompt(plain_save(prefix)))) == ""  # the next one is fine
