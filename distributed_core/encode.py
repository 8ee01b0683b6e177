"""PNG files written side by side: the output nodes after a Collector save N GPUs' images on the master.

ComfyUI's SaveImage and PreviewImage encode a batch one image after another on the execution thread.
With N GPUs feeding one master that work is N times larger, and it was about 30 % of a master's busy
time on two GPUs: at eight it would take longer than the rendering. Pillow's zlib encoder releases
the GIL, so the encodes can run on every core the instance has.

``deferred_saves(function)`` wraps such a node function: while it runs, each ``Image.save`` of a
PNG to a file name made on that thread is handed to a thread pool and returns at once; the wrapper
waits for every file before it returns, and raises the first error, naming the file. Names,
counters, metadata and bytes stay exactly what the node itself makes, since the node still decides
them; only the encodes overlap. Saves on other threads, to open files, or in other formats are
left alone. The node returns once its files are whole, as in ComfyUI, so its history entry, the
queue, the jobs API and the asset catalogue see every file complete.

One large image (a tiled upscale's result: 4 to 16 megapixels) would still be one encode on one
core. An 8-bit RGB or RGBA image of at least STRIP_PIXELS, saved with nothing but ComfyUI's
``pnginfo`` and ``compress_level``, is therefore encoded in horizontal strips on every core
(``png_in_strips``): each strip Paeth-filtered and deflated apart, flushed to a byte boundary,
the streams joined into one zlib stream. The file holds the same pixels and the same text chunks,
in other bytes; any PNG reader reads it as one image.

``deferred_saves(function, texts_for)`` also gives each image of a call its own text entries:
``texts_for(args, kwargs)`` returns one dict per image, in save order (after a Collector: the
prompt and workflow that make that image, see provenance.py), or None to keep the node's own.
Set ``COMFYUI_DISTRIBUTED_SERIAL_SAVE=1`` to encode one file after another on the node's thread,
as ComfyUI does; the text entries are still given.
"""
from __future__ import annotations

import functools
import os
import struct
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

DISABLE_VARIABLE = "COMFYUI_DISTRIBUTED_SERIAL_SAVE"  # set to 1 to keep ComfyUI's one-at-a-time saving

_local = threading.local()
_pool_lock = threading.Lock()
_save: Callable = Image.Image.save  # Pillow's own, kept before any wrapping
_pools: dict[str, ThreadPoolExecutor] = {}  # by name: "files", and "strips" (the files' threads wait for those)
STRIP_PIXELS = 1 << 21  # images of at least this many pixels are encoded in strips on every core
STRIP_ROWS = 128


def workers() -> int:
    """One encoder per core this process may use (the launcher pins each instance to its own)."""
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return max(1, min(32, len(usable)))


def _executor(name: str = "files") -> ThreadPoolExecutor:
    with _pool_lock:
        if name not in _pools:
            _pools[name] = ThreadPoolExecutor(workers(), thread_name_prefix=f"distributed-png-{name}")
        return _pools[name]


def _is_png_file(fp, format_name: str | None) -> bool:
    if not isinstance(fp, (str, os.PathLike)):
        return False
    if format_name:
        return format_name.upper() == "PNG"
    return os.fspath(fp).lower().endswith(".png")


def _in_strips(image: Image.Image, params: dict) -> bool:
    return (image.mode in ("RGB", "RGBA") and image.width * image.height >= STRIP_PIXELS and workers() > 1
            and set(params) <= {"pnginfo", "compress_level"} and not image.info.get("icc_profile"))


def _filtered_strip(pixels: np.ndarray, first: int, last: int) -> bytes:
    """Rows first..last-1 of an (h, w, c) uint8 array, each Paeth-filtered (PNG filter type 4)
    against the row above it (none above the first row of the image) and led by its filter byte."""
    rows = pixels[first:last].astype(np.int16)
    up = pixels[first - 1:last - 1].astype(np.int16) if first else None
    if up is None:
        up = np.zeros_like(rows)
        up[1:] = rows[:-1]
    left = np.zeros_like(rows)
    left[:, 1:] = rows[:, :-1]
    up_left = np.zeros_like(rows)
    up_left[:, 1:] = up[:, :-1]
    estimate = left + up - up_left
    to_left, to_up, to_up_left = np.abs(estimate - left), np.abs(estimate - up), np.abs(estimate - up_left)
    predicted = np.where((to_left <= to_up) & (to_left <= to_up_left), left, np.where(to_up <= to_up_left, up, up_left))
    filtered = ((rows - predicted) & 0xFF).astype(np.uint8).reshape(last - first, -1)
    return np.concatenate([np.full((last - first, 1), 4, np.uint8), filtered], axis=1).tobytes()


def _deflated_strip(pixels: np.ndarray, first: int, last: int, level: int, final: bool) -> tuple[bytes, bytes]:
    raw = _filtered_strip(pixels, first, last)
    compressor = zlib.compressobj(level, zlib.DEFLATED, -15)
    return raw, compressor.compress(raw) + compressor.flush(zlib.Z_FINISH if final else zlib.Z_FULL_FLUSH)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_in_strips(image: Image.Image, pnginfo=None, compress_level: int = 6) -> bytes:
    """The PNG file of an 8-bit RGB or RGBA image, its strips filtered and deflated in parallel;
    pnginfo's chunks (ComfyUI's prompt and workflow text) as Pillow would place them."""
    pixels = np.asarray(image)
    height, width = pixels.shape[:2]
    bounds = [(r, min(r + STRIP_ROWS, height)) for r in range(0, height, STRIP_ROWS)]
    level = max(0, min(9, int(compress_level)))
    strips = list(_executor("strips").map(
        lambda b: _deflated_strip(pixels, b[0], b[1], level, b[1] == height), bounds))
    checksum = 1
    for raw, _packed in strips:
        checksum = zlib.adler32(raw, checksum)
    stream = b"\x78\x9c" + b"".join(packed for _raw, packed in strips) + struct.pack(">I", checksum & 0xFFFFFFFF)
    before, after = [], []
    for entry in getattr(pnginfo, "chunks", None) or []:
        kind, data, after_idat = (entry + (False,))[:3]
        (after if after_idat else before).append(_chunk(kind, data))
    header = struct.pack(">IIBBBBB", width, height, 8, 6 if image.mode == "RGBA" else 2, 0, 0, 0)
    return b"".join([b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", header), *before, _chunk(b"IDAT", stream), *after,
                     _chunk(b"IEND", b"")])


def _write(image: Image.Image, fp, format_name, params: dict) -> None:
    try:
        if _in_strips(image, params):
            data = png_in_strips(image, **params)
            with open(fp, "wb") as handle:
                handle.write(data)
        else:
            _save(image, fp, format_name, **params)
    except OSError as exc:
        raise OSError(exc.errno, f"could not write {os.path.basename(os.fspath(fp))}: {exc.strerror or exc}") from exc


def retexted(info: PngInfo, texts: dict[str, str]) -> PngInfo:
    """``info`` with the text entries named in ``texts`` replaced (in place), the others added."""
    result, written = PngInfo(), set()
    for entry in getattr(info, "chunks", None) or []:
        kind, data, after_idat = (entry + (False,))[:3]
        key = data.split(b"\0", 1)[0].decode("latin-1") if kind in (b"tEXt", b"iTXt", b"zTXt") else None
        if key in texts:
            if key not in written:
                result.add_text(key, texts[key])
                written.add(key)
            continue
        result.add(kind, data, after_idat)
    for key, value in texts.items():
        if key not in written:
            result.add_text(key, value)
    return result


def _serial() -> bool:
    return os.environ.get(DISABLE_VARIABLE, "").strip() not in ("", "0")


def _save_maybe_later(image: Image.Image, fp, format=None, **params):  # noqa: A002 - Pillow's name
    if not _is_png_file(fp, format):
        return _save(image, fp, format, **params)
    texts = getattr(_local, "texts", None)
    mine = next(texts, None) if texts is not None else None
    if mine and params.get("pnginfo") is not None:  # no metadata (--disable-metadata) stays none
        params = {**params, "pnginfo": retexted(params["pnginfo"], mine)}
    pending: list[Future] | None = getattr(_local, "pending", None)
    if pending is None:
        return _save(image, fp, format, **params)
    image.load()  # read lazily opened pixels here, not on a pool thread
    pending.append(_executor().submit(_write, image, fp, format, params))
    return None


def deferred_saves(function: Callable, texts_for: Callable[[tuple, dict], list | None] | None = None) -> Callable:
    """``function`` with its PNG file saves encoded in parallel, each image with the text entries
    that ``texts_for`` gives; see the module's docstring."""
    if getattr(function, "deferred_saves", False):
        return function

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        if getattr(_local, "inside", False):  # nested: the outer call waits for all
            return function(*args, **kwargs)
        given = texts_for(args, kwargs) if texts_for is not None else None
        _local.inside, _local.texts = True, iter(given) if given else None
        _local.pending = pending = None if _serial() else []
        try:
            result = function(*args, **kwargs)
        finally:
            _local.inside, _local.texts, _local.pending = False, None, None
            errors = [f.exception() for f in pending or []]  # waits for every file, even after an error
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        return result

    wrapper.deferred_saves = True
    return wrapper


def install() -> bool:
    """Route Pillow's saves through the deferral (a no-op on threads outside ``deferred_saves``).
    Returns whether saves run in parallel (not when the variable asks for serial saves)."""
    Image.Image.save = _save_maybe_later
    return not _serial()
