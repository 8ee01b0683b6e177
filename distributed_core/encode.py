"""PNG files written side by side: the output nodes after a Collector save N GPUs' images on the master.

ComfyUI's SaveImage and PreviewImage encode a batch one image after another on the execution thread.
With N GPUs feeding one master that work is N times larger, and it was about 30 % of a master's busy
time on two GPUs: at eight it would take longer than the rendering. Pillow's zlib encoder releases
the GIL, so the encodes can run on every core the instance has.

``deferred_saves(function)`` wraps such a node function: while it runs, each ``Image.save`` of a
PNG to a file name made on that thread is handed to a thread pool and returns at once; the wrapper
waits for every file before it returns, and raises the first error. Names, counters, metadata and
bytes stay exactly what the node itself makes, since the node still decides them; only the time of
the encode moves. Saves on other threads, to open files, or in other formats are left alone.

Write-behind (once ``install_finisher`` stands in for the queue's ``task_done``): the node does not
wait for its files either, so the execution thread starts the next prompt while the last one's
PNGs are encoded on other cores. What ComfyUI promises stays true:
- each file's name is taken at once (an empty file under that name, so that the next save's counter
  goes past it); the image is written beside it under a hidden name and moved over it when complete,
  so the file is either empty or whole, never partial;
- the prompt's history entry (and the queue's "done") is recorded only once every file of that
  prompt is written, in the order the prompts ran; a file that could not be written turns the
  entry into an error that names it;
- ``GET /view`` of a file still being written waits for it (the glue's middleware asks ``saving``).
"""
from __future__ import annotations

import copy
import functools
import logging
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from PIL import Image

DISABLE_VARIABLE = "COMFYUI_DISTRIBUTED_SERIAL_SAVE"  # set to 1 to keep ComfyUI's one-at-a-time saving
BEHIND_VARIABLE = "COMFYUI_DISTRIBUTED_SAVE_BEHIND"  # set to 0 to have each node wait for its files

_local = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_save: Callable = Image.Image.save  # Pillow's own, kept before any wrapping
_finisher: "Finisher | None" = None  # set once the queue's task_done waits for the files instead
_saving: dict[str, list[Future]] = {}  # file base name -> its writes still under way
_saving_lock = threading.Lock()

log = logging.getLogger("comfyui-distributed")


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


def _save_maybe_later(image: Image.Image, fp, format=None, **params):  # noqa: A002 - Pillow's name
    pending: list[Future] | None = getattr(_local, "pending", None)
    if pending is None or not _is_png_file(fp, format):
        return _save(image, fp, format, **params)
    image.load()  # read lazily opened pixels here, not on a pool thread
    if _finisher is None:
        pending.append(_executor().submit(_save, image, fp, format, **params))
        return None
    path = os.fspath(fp)
    try:
        open(path, "xb").close()  # the name is taken now; raises here, in the node, if it cannot be
        created = True
    except FileExistsError:  # the node saves over a file: it stays as it was until the new one is whole
        created = False
    future = _executor().submit(_write_whole, image, path, created, params)
    name = os.path.basename(path)
    with _saving_lock:
        _saving.setdefault(name, []).append(future)
    future.add_done_callback(lambda done: _forget(name, done))
    prompt_saves = getattr(_local, "prompt_saves", None)
    if prompt_saves is None:
        prompt_saves = _local.prompt_saves = []
    prompt_saves.append((path, future))
    return None


def _write_whole(image: Image.Image, path: str, created: bool, params: dict) -> None:
    """Encode beside ``path`` under a hidden name, then move the whole file over it."""
    folder, name = os.path.split(path)
    partial = os.path.join(folder, f".{name}.{threading.get_ident()}.partial")
    try:
        _save(image, partial, "PNG", **params)
        os.replace(partial, path)
    except BaseException:
        for leftover in (partial, path if created else None):
            try:
                if leftover and (leftover == partial or os.path.getsize(leftover) == 0):
                    os.remove(leftover)
            except OSError:
                pass
        raise


def _forget(name: str, future: Future) -> None:
    with _saving_lock:
        futures = _saving.get(name, [])
        if future in futures:
            futures.remove(future)
        if not futures:
            _saving.pop(name, None)


def saving(name: str) -> list[Future]:
    """The writes still under way of files with this base name (for GET /view to wait on)."""
    with _saving_lock:
        return list(_saving.get(os.path.basename(name or ""), ()))


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
            # waits for every file, even after an error (with write-behind, none is listed here:
            # the prompt's history entry waits instead)
            errors = [f.exception() for f in pending]
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


# --- write-behind: a prompt is done once its files are -------------------------------------------------

class Finisher:
    """Stands in for ComfyUI's ``PromptQueue.task_done`` (called on the execution thread when a
    prompt has run): a prompt that saved no file still being written is recorded at once, as
    before; otherwise its record waits, in order, on a thread of its own, until its files are
    written. ``task_done(item_id, outputs, status=...)`` has had this shape from 2024 to today."""

    def __init__(self, queue):
        self.queue = queue
        self.task_done = queue.task_done
        self.backlog: deque = deque()      # (item id, prompt id, outputs, args, kwargs, saves)
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None

    def __call__(self, item_id, outputs=None, *args, **kwargs):
        saves = getattr(_local, "prompt_saves", None) or []
        _local.prompt_saves = []
        with self.cond:
            if not saves and not self.backlog:
                direct = True
            else:
                direct = False
                running = getattr(self.queue, "currently_running", {}).get(item_id)
                prompt_id = str(running[1]) if isinstance(running, (list, tuple)) and len(running) > 1 else ""
                # ComfyUI may reuse what it passed (the UI outputs dict of 2024) for the next prompt
                self.backlog.append((item_id, prompt_id, copy.deepcopy(outputs), copy.deepcopy(args),
                                     copy.deepcopy(kwargs), saves))
                if self.thread is None:
                    self.thread = threading.Thread(target=self._run, name="distributed-finisher", daemon=True)
                    self.thread.start()
                self.cond.notify_all()
        if direct:
            return self.task_done(item_id, outputs, *args, **kwargs)
        return None

    def finishing(self, prompt_id: str) -> bool:
        """Whether this prompt has run and only waits for its files."""
        with self.cond:
            return any(entry[1] == prompt_id for entry in self.backlog)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every waiting record is written (for tests and shutdown)."""
        with self.cond:
            return self.cond.wait_for(lambda: not self.backlog, timeout)

    def _run(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: bool(self.backlog))
                item_id, prompt_id, outputs, args, kwargs, saves = self.backlog[0]
            failures = []
            for path, future in saves:
                error = future.exception()
                if error is not None:
                    failures.append(f"{os.path.basename(path)}: {error}")
                    log.error("[Distributed] prompt %s: the image %s could not be written: %s",
                              prompt_id[:8], path, error)
            if failures:
                args, kwargs = _as_failed(args, kwargs, prompt_id, failures)
            try:
                self.task_done(item_id, outputs, *args, **kwargs)
            except Exception:  # noqa: BLE001 - the next prompts still get their records
                log.exception("[Distributed] could not record prompt %s as done", prompt_id[:8])
            with self.cond:
                self.backlog.popleft()
                self.cond.notify_all()


def _as_failed(args: tuple, kwargs: dict, prompt_id: str, failures: list[str]) -> tuple[tuple, dict]:
    """The task_done arguments with the status turned into an error that names the files."""
    status = kwargs.get("status", args[0] if args else None)
    if status is None or not hasattr(status, "_replace"):
        return args, kwargs
    error = {"prompt_id": prompt_id, "node_id": None, "node_type": "SaveImage",
             "exception_message": "could not write " + "; ".join(failures),
             "exception_type": "OSError", "traceback": [], "current_inputs": [], "current_outputs": [],
             "executed": []}
    failed = status._replace(status_str="error", completed=False,
                             messages=list(status.messages or []) + [["execution_error", error]])
    if "status" in kwargs or not args:
        return args, {**kwargs, "status": failed}
    return (failed, *args[1:]), kwargs


def install_finisher(queue: Any) -> bool:
    """Let prompts' files be written behind (see the module's docstring): on a queue shaped as
    ComfyUI's (a callable task_done, a currently_running dict), once."""
    global _finisher
    if _finisher is not None:
        return True
    if os.environ.get(BEHIND_VARIABLE, "").strip() == "0":
        return False
    if not callable(getattr(queue, "task_done", None)) or not isinstance(getattr(queue, "currently_running", None), dict):
        return False
    _finisher = Finisher(queue)
    queue.task_done = _finisher
    return True


def finishing(prompt_id: str) -> bool:
    """Whether the prompt has run and only waits for its files to be written."""
    return _finisher is not None and _finisher.finishing(prompt_id)
