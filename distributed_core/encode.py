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
"""
from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from PIL import Image

DISABLE_VARIABLE = "COMFYUI_DISTRIBUTED_SERIAL_SAVE"  # set to 1 to keep ComfyUI's one-at-a-time saving

_local = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_save: Callable = Image.Image.save  # Pillow's own, kept before any wrapping


def workers() -> int:
    """One encoder per core this process may use (the launcher pins each instance to its own)."""
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return max(1, min(32, len(usable)))


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(workers(), thread_name_prefix="distributed-png")
        return _pool


def _is_png_file(fp, format_name: str | None) -> bool:
    if not isinstance(fp, (str, os.PathLike)):
        return False
    if format_name:
        return format_name.upper() == "PNG"
    return os.fspath(fp).lower().endswith(".png")


def _write(image: Image.Image, fp, format_name, params: dict) -> None:
    try:
        _save(image, fp, format_name, **params)
    except OSError as exc:
        raise OSError(exc.errno, f"could not write {os.path.basename(os.fspath(fp))}: {exc.strerror or exc}") from exc


def _save_maybe_later(image: Image.Image, fp, format=None, **params):  # noqa: A002 - Pillow's name
    pending: list[Future] | None = getattr(_local, "pending", None)
    if pending is None or not _is_png_file(fp, format):
        return _save(image, fp, format, **params)
    image.load()  # read lazily opened pixels here, not on a pool thread
    pending.append(_executor().submit(_write, image, fp, format, params))
    return None


def deferred_saves(function: Callable) -> Callable:
    """``function`` with its PNG file saves encoded in parallel; see the module's docstring."""
    if getattr(function, "deferred_saves", False):
        return function

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        if getattr(_local, "pending", None) is not None:  # nested: the outer call waits for all
            return function(*args, **kwargs)
        _local.pending = pending = []
        try:
            result = function(*args, **kwargs)
        finally:
            _local.pending = None
            errors = [f.exception() for f in pending]  # waits for every file, even after an error
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        return result

    wrapper.deferred_saves = True
    return wrapper


def install() -> bool:
    """Route Pillow's saves through the deferral (a no-op on threads outside ``deferred_saves``)."""
    if os.environ.get(DISABLE_VARIABLE, "").strip() not in ("", "0"):
        return False
    Image.Image.save = _save_maybe_later
    return True
