"""Jobs on the master and the results that arrive for them.

Results arrive on the server's event loop; the Collector waits for them on ComfyUI's execution
thread. A Condition joins the two.

Each Collector's final batch (float32) is allocated once, when the first share's shape is known,
and every frame is read straight into its rows: the master holds about one copy of the batch. A
share that does not fit that layout is kept apart and joined at the end. Audio that comes with a
share (the Collector's AUDIO input) is kept beside it, one part per frame, and handed over in the
images' order; a job's frames for one Collector either all carry audio or none does.

Memory is bounded: results for jobs that the master has not reached yet are refused with "retry
later" once ``budget_bytes`` is held, except for the oldest job, so the job that runs now can
always finish.
"""
from __future__ import annotations

import asyncio
import collections
import enum
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import wire
from .audio import Sound
from .plan import MASTER_ID, chunks_of
from .wire import Header


log = logging.getLogger("comfyui-distributed")

FINISHED_MEMORY = 256  # how many finished job ids are remembered, to answer late results with 410
RECENT_SHOWN = 20      # how many finished jobs GET /distributed/status still shows, with their notices


class JobState(enum.Enum):
    PLANNED = "planned"      # prompt rewritten, waiting for the master to accept it
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"



class JobFailed(RuntimeError):
    pass


@dataclass
class Share:
    """What one participant has been asked to render, and how it is going.

    ``units`` lists the units it covers; a unit is a seed slot (multiply mode) or one global batch
    index (split mode, where a share is one contiguous chunk)."""
    participant: str
    label: str
    units: list[int]
    url: str = ""             # the worker's address when it was dispatched (config may change since)
    prompt_id: str = ""
    dispatched: float = 0.0
    state: str = "waiting"    # waiting | queued | running | done | failed | cancelled
    error: str = ""
    values: list[str] = field(default_factory=list)  # its Distributed Values, as the panel shows them
    steps: list[int] = field(default_factory=list)   # [step, steps] of its sampling, as its worker last told
    # The client id its prompt is queued under, on which the worker's websocket tells its progress
    # (not a credential: anyone who reads the worker's queue sees it).
    client_id: str = field(default_factory=lambda: f"comfyui-distributed-{secrets.token_hex(6)}")
    # What the worker shows when it delivers: good for this share's units only, each of them once.
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))


@dataclass
class Job:
    id: str
    collectors: list[str]
    units: list[int]                              # every unit, in output order
    split: bool = False                           # units are global batch indices, shared out in chunks
    prompt_id: str = ""
    state: JobState = JobState.PLANNED
    created: float = field(default_factory=time.monotonic)
    shares: dict[str, Share] = field(default_factory=dict)
    # (collector, first unit) -> (units covered, images); a chunk covers a run of units
    results: dict[tuple[str, int], tuple[int, Any]] = field(default_factory=dict)
    covered: dict[str, set[int]] = field(default_factory=dict)
    canvases: dict[str, np.ndarray] = field(default_factory=dict)   # collector -> its final batch
    inflight: set[int] = field(default_factory=set)                 # units being received now
    held_bytes: int = 0
    error: str = ""
    notices: list[str] = field(default_factory=list)  # failures that were recovered from
    taken: set[str] = field(default_factory=set)       # Collectors that have their batch
    audio: set[str] = field(default_factory=set)       # Collectors whose audio input is connected
    sounds: dict[tuple[str, int], Sound] = field(default_factory=dict)  # beside ``results``, same keys
    # collector -> (height, width, channels) of its images, set by the first part placed
    sizes: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    images: dict[tuple[str, int], int] = field(default_factory=dict)  # beside ``results``: how many images
    per_unit: dict[str, int] = field(default_factory=dict)  # collector -> images per unit, from the first part

    def all_taken(self) -> bool:
        return set(self.collectors) <= self.taken

    def summary(self) -> dict:
        """What the panel shows of a job: each share, how many of its units and images have arrived,
        and the step its worker samples; the images the job makes, once the first part tells."""
        first = self.collectors[0] if self.collectors else ""
        made = {unit: count for (collector, unit), count in self.images.items() if collector == first}
        per = self.per_unit.get(first)
        return {
            "job_id": self.id, "prompt_id": self.prompt_id, "state": self.state.value,
            "error": self.error, "notices": list(self.notices), "units": len(self.units),
            "done": len(self.units) if first in self.taken else self.delivered(first), "split": self.split,
            "images": sum(made.values()), "images_due": per * len(self.units) if per else None,
            "shares": [{"participant": s.participant, "name": s.label, "units": list(s.units),
                        "done": sum(1 for u in s.units if self.has(first, u) or first in self.taken),
                        "images": sum(count for unit, count in made.items() if unit in s.units),
                        "steps": list(s.steps), "state": s.state, "error": s.error, "values": list(s.values)}
                       for s in self.shares.values()],
        }

    def delivered(self, collector: str) -> int:
        return len(self.covered.get(collector, ()))

    def has(self, collector: str, unit: int) -> bool:
        return unit in self.covered.get(collector, ())

    def missing_units(self, units: list[int]) -> list[int]:
        return [u for u in units if any(not self.has(c, u) for c in self.collectors)]

    def chunks(self, share: Share) -> list[list[int]]:
        """The [first, count] frames a share's worker sends: one per unit in multiply mode, one per
        run of consecutive indices in split mode (what its prompt's chunks say)."""
        return chunks_of(share.units) if self.split else [[u, 1] for u in share.units]

    def share_with(self, token: str) -> Share | None:
        """The worker share that this token was given to (the master's own share takes no frames)."""
        found = None
        for share in list(self.shares.values()):
            if share.participant != MASTER_ID and wire.same_token(token, share.token):
                found = share
        return found

    def position(self, unit: int) -> int:
        return self.units.index(unit) if not self.split else unit

    def record(self, collector: str, first: int, count: int, value: Any, nbytes: int = 0,
               sound: Sound | None = None) -> None:
        self.results[(collector, first)] = (count, value)
        canvas = self.canvases.get(collector)
        rows = len(value) if value is not None else canvas.shape[0] // len(self.units) * count if canvas is not None else count
        self.images[(collector, first)] = rows
        self.per_unit.setdefault(collector, max(1, rows // max(1, count)))
        if sound is not None:
            self.sounds[(collector, first)] = sound
            nbytes += sound.nbytes
        self.covered.setdefault(collector, set()).update(range(first, first + count))
        self.held_bytes += nbytes

    def size_refusal(self, collector: str, size: tuple[int, int, int], sender: str) -> str:
        """Why images of this (height, width, channels) do not belong to this job ('' when they do)."""
        held = self.sizes.get(collector)
        if held is None or tuple(size) == held:
            return ""
        return (f"{sender} sent {size_text(size)} images for collector {collector}, which already holds "
                f"{size_text(held)} images (the first part that arrived sets the size); every participant "
                "must render the same size")

    def audio_refusal(self, collector: str, carries: bool, sender: str) -> str:
        """Why a part with (or without) audio does not belong to this job ('' when it does)."""
        if carries == (collector in self.audio):
            return ""
        if carries:
            return (f"{sender} sent audio for collector {collector}, whose audio input is not connected in this "
                    "job; parts with and without audio are never mixed")
        return (f"collector {collector} gathers audio in this job but {sender} sent its images without any; "
                "parts with and without audio are never mixed (does it run an older version of the extension?)")

    def held(self) -> int:
        return (sum(getattr(v, "nbytes", 0) for _c, v in self.results.values())
                + sum(c.nbytes for c in self.canvases.values()) + sum(s.nbytes for s in self.sounds.values()))


def size_text(size) -> str:
    height, width, channels = size
    return f"{width}x{height} {channels}-channel"


def units_text(first: int, count: int) -> str:
    return f"unit {first}" if count == 1 else f"units {first}-{first + count - 1}"


class Ledger:
    """Jobs of one kind by id, under one lock, and how the last ones ended: what the Collector's
    JobStore and the tiled upscale's Board share. ``FAILED`` is the kind's failed state (a
    failure stays the reason a job ended); ``_release(job)`` drops what an ending job holds."""

    FAILED: Any = None

    def __init__(self, on_change: Callable[[Any], None] | None = None):
        self.on_change = on_change or (lambda job: None)
        self._cond = threading.Condition()
        self._jobs: dict[str, Any] = {}
        self._finished: collections.OrderedDict[str, str] = collections.OrderedDict()

    def _notify(self, job) -> None:
        try:
            self.on_change(job)
        except Exception:  # noqa: BLE001 - a progress message never breaks the job
            log.debug("[Distributed] progress message failed", exc_info=True)

    def add(self, job) -> None:
        with self._cond:
            self._jobs[job.id] = job

    def get(self, job_id: str):
        with self._cond:
            return self._jobs.get(job_id)

    def active(self) -> list:
        with self._cond:
            return list(self._jobs.values())

    def update(self, job_id: str, change: Callable[[Any], None]):
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            change(job)
            self._cond.notify_all()
        self._notify(job)
        return job

    def end(self, job_id: str, state, error: str = ""):
        """Finish a job and drop what it holds; later requests for it are answered 410."""
        with self._cond:
            job = self._jobs.pop(job_id, None)
            if job is None:
                return None
            if job.state is not self.FAILED:
                job.state = state
            job.error = job.error or error
            self._release(job)
            self._finished[job_id] = state.value
            while len(self._finished) > FINISHED_MEMORY:
                self._finished.popitem(last=False)
            self._cond.notify_all()
        self._notify(job)
        return job

    def _release(self, job) -> None:
        pass


class JobStore(Ledger):
    FAILED = JobState.FAILED

    def __init__(self, budget_bytes: int = 8 << 30, on_change: Callable[[Job], None] | None = None):
        super().__init__(on_change)
        self.budget_bytes = budget_bytes
        self._recent: collections.deque[dict] = collections.deque(maxlen=RECENT_SHOWN)

    def recent(self) -> list[dict]:
        """Summaries of the jobs that ended last, newest first (what was left out and why stays
        visible after the job)."""
        with self._cond:
            return list(reversed(self._recent))

    def held_bytes(self) -> int:
        with self._cond:
            return sum(j.held_bytes for j in self._jobs.values())

    def _release(self, job: Job) -> None:
        for share in job.shares.values():
            if share.state not in ("done", "failed"):
                share.state = "done" if job.state is JobState.DONE else "cancelled"
        job.results.clear()
        job.sounds.clear()
        job.held_bytes = 0
        self._recent.append(job.summary())

    def fail(self, job_id: str, message: str) -> None:
        """Mark a job failed; the Collector waiting for it raises with the message."""
        def change(job: Job) -> None:
            if job.state in (JobState.PLANNED, JobState.RUNNING):
                job.state = JobState.FAILED
                job.error = message
        self.update(job_id, change)

    # --- results -----------------------------------------------------------------------------
    def check(self, header: Header) -> Job:
        """Refuse a result before its body is read: unknown job, wrong token, wrong unit, no room."""
        with self._cond:
            job = self._jobs.get(header.job)
            if job is None:
                if header.job in self._finished:
                    raise wire.Rejected(410, f"job {header.job} has already ended "
                                              f"({self._finished[header.job]}); result discarded")
                raise wire.Rejected(404, f"no job {header.job} on this master")
            share = job.share_with(header.token)
            if share is None:
                raise wire.Rejected(403, "wrong token for this job")
            frames = job.chunks(share)
            if header.collector not in job.collectors or [header.unit, header.count] not in frames:
                raise wire.Rejected(400, f"{share.label} was given units {frames} as [first, count] "
                                          f"for collector(s) {', '.join(job.collectors)}; this frame claims "
                                          f"[{header.unit}, {header.count}] for collector {header.collector}")
            covers = range(header.unit, header.unit + header.count)
            if job.state not in (JobState.PLANNED, JobState.RUNNING):
                raise wire.Rejected(410, f"job {job.id} is {job.state.value}; result discarded")
            if any(job.has(header.collector, u) for u in covers) or set(covers) & job.inflight:
                raise wire.Rejected(409, f"units from {header.unit} of job {job.id} were delivered already")
            refusal = (job.size_refusal(header.collector, header.shape[1:], share.label)
                       or job.audio_refusal(header.collector, header.audio is not None, share.label))
            if refusal:
                raise wire.Rejected(400, refusal)
            return job

    def _admit(self, job: Job, size: int) -> None:
        oldest = min(self._jobs.values(), key=lambda j: j.created)
        held = sum(j.held_bytes for j in self._jobs.values())
        if job is not oldest and held + size > self.budget_bytes:
            raise wire.Rejected(503, "the master holds its result budget for earlier jobs; retry later")

    def _place(self, job: Job, collector: str, first: int, count: int, shape) -> np.ndarray | None:
        """Rows of the Collector's final batch for these units, or None if they do not fit it."""
        rows, height, width, channels = shape
        job.sizes.setdefault(collector, (height, width, channels))
        if count < 1 or rows % count:
            return None
        layout = (rows // count, height, width, channels)
        canvas = job.canvases.get(collector)
        if canvas is None:
            full = (len(job.units) * layout[0], height, width, channels)
            size = int(np.prod(full)) * 4
            self._admit(job, size)
            canvas = job.canvases[collector] = np.empty(full, dtype=np.float32)
            job.held_bytes += size
        if (canvas.shape[0] // len(job.units), *canvas.shape[1:]) != layout:
            return None
        start = job.position(first) * layout[0]
        return canvas[start:start + rows]

    def reserve(self, header: Header) -> np.ndarray | None:
        """Claim a frame's units before reading its body; returns the rows it goes into, or None
        when it must be held apart (then its size counts against the budget)."""
        with self._cond:
            job = self.check(header)
            view = self._place(job, header.collector, header.unit, header.count, header.shape)
            apart = (header.raw_size if view is None else 0) + header.audio_size
            if apart:
                self._admit(job, apart)
            job.inflight.update(range(header.unit, header.unit + header.count))
            return view

    def release(self, header: Header) -> None:
        """A frame's units were not delivered after all: another frame may bring them, and a size it
        set when nothing else had arrived is unset."""
        with self._cond:
            job = self._jobs.get(header.job)
            if job is not None:
                job.inflight.difference_update(range(header.unit, header.unit + header.count))
                if not job.covered.get(header.collector) and not job.inflight:
                    job.sizes.pop(header.collector, None)

    def commit(self, header: Header, kept_apart: np.ndarray | None, waveform: np.ndarray | None = None) -> None:
        """The frame's body is in place (or in ``kept_apart``), its audio in ``waveform``: its units
        have arrived."""
        def change(job: Job) -> None:
            job.inflight.difference_update(range(header.unit, header.unit + header.count))
            sound = None
            if header.audio is not None and waveform is not None:
                share = job.share_with(header.token)
                sender = share.label if share is not None else "a worker"
                sound = Sound(header.audio[0], waveform, f"{sender} ({units_text(header.unit, header.count)})")
            job.record(header.collector, header.unit, header.count, kept_apart,
                       0 if kept_apart is None else kept_apart.nbytes, sound)
        if self.update(header.job, change) is None:
            raise wire.Rejected(410, f"job {header.job} ended while its result was arriving; discarded")

    def place_local(self, job_id: str, collector: str, first: int, count: int, shape) -> np.ndarray | None:
        """Rows of the final batch for the master's own images, or None when they must be held
        apart. Raises JobFailed when the job has ended."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None:
                raise JobFailed(f"job {job_id} is gone ({self._finished.get(job_id, 'unknown')})")
            return self._place(job, collector, first, count, shape)

    def put_local(self, job_id: str, collector: str, first: int, count: int, images: np.ndarray,
                  sound: Sound | None = None) -> None:
        """place_local, copy, record_local in one call (Collector jobs copy off the event loop)."""
        view = self.place_local(job_id, collector, first, count, images.shape)
        if view is not None:
            view[...] = images
        self.record_local(job_id, collector, first, count, None if view is not None else images, sound)

    def record_local(self, job_id: str, collector: str, first: int, count: int, kept_apart: np.ndarray | None,
                     sound: Sound | None = None) -> None:
        """The master's own images are in place (or in ``kept_apart``), with their audio if any.
        Raises JobFailed when the job has ended, or when the audio does not belong to it."""
        refused = []

        def change(job: Job) -> None:
            refused.append(job.audio_refusal(collector, sound is not None, "the master"))
            if not refused[0]:
                job.record(collector, first, count, kept_apart, 0,
                           None if sound is None else Sound(sound.sample_rate, sound.waveform,
                                                            f"master ({units_text(first, count)})"))
        if self.update(job_id, change) is None:
            raise JobFailed(f"job {job_id} is gone ({self._finished.get(job_id, 'unknown')})")
        if refused[0]:
            raise JobFailed(refused[0])

    def wait(self, job_id: str, collector: str, timeout: float) -> tuple[int, bool]:
        """Block up to ``timeout`` for progress; returns (units delivered, complete). Raises JobFailed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                job = self._jobs.get(job_id)
                if job is None:
                    raise JobFailed(f"job {job_id} is gone ({self._finished.get(job_id, 'unknown')})")
                if job.state is JobState.FAILED:
                    raise JobFailed(job.error)
                done = job.delivered(collector)
                if done >= len(job.units):
                    return done, True
                left = deadline - time.monotonic()
                if left <= 0:
                    return done, False
                self._cond.wait(left)

    def take(self, job_id: str, collector: str) -> list[Any]:
        """One Collector's results in unit order, handed over (the store lets go of them): the
        final batch alone when every share fitted into it, else its parts to be joined."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None:
                raise JobFailed(f"job {job_id} is gone ({self._finished.get(job_id, 'unknown')})")
            mine = sorted((k for k in job.results if k[0] == collector), key=lambda k: job.position(k[1]))
            canvas = job.canvases.pop(collector, None)
            parts = []
            for key in mine:
                count, value = job.results.pop(key)
                if value is None:
                    per = canvas.shape[0] // len(job.units)
                    start = job.position(key[1]) * per
                    value = canvas[start:start + count * per]
                parts.append(value)
            job.taken.add(collector)
            job.held_bytes = job.held()
            if canvas is not None and all(isinstance(p, np.ndarray) and p.base is canvas for p in parts) \
                    and sum(len(p) for p in parts) == len(canvas):
                return [canvas]
            return parts

    def take_sounds(self, job_id: str, collector: str) -> list[Sound] | None:
        """One Collector's audio parts in the order of its image parts (call it before ``take``),
        handed over; None when its audio input is not connected in this job."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None:
                raise JobFailed(f"job {job_id} is gone ({self._finished.get(job_id, 'unknown')})")
            if collector not in job.audio:
                return None
            keys = sorted((k for k in job.results if k[0] == collector), key=lambda k: job.position(k[1]))
            missing = [units_text(k[1], job.results[k][0]) for k in keys if k not in job.sounds]
            if missing:  # every frame of such a collector carries audio (check and record_local see to it)
                raise JobFailed(f"collector {collector} gathers audio but {', '.join(missing)} arrived without any")
            sounds = [job.sounds.pop(k) for k in keys]
            job.held_bytes = job.held()
            return sounds


async def receive(store: JobStore, reader, content_length: int | None) -> Header:
    """Read one result frame from a request body straight into its place. Raises wire.Rejected
    with the status to answer; decoding PNGs runs off the event loop."""
    header = await wire.read_header(reader, content_length, "result frame")
    view = store.reserve(header)
    try:
        target = view if view is not None else np.empty(header.shape, dtype=np.float32)
        if header.encoding == "png":
            payload = await wire.read_exactly(reader, header.image_size, "result frame")
            try:
                await asyncio.get_running_loop().run_in_executor(None, wire.unpack_png, header, payload, target)
            except wire.FrameError as exc:
                raise wire.Rejected(400, f"bad result frame: {exc}") from None
        else:
            await _read_converting(reader, header, target)
        waveform = None
        if header.audio is not None:
            waveform = np.empty(header.audio[1], dtype=np.float32)
            await wire.read_into(reader, memoryview(waveform.reshape(-1).view(np.uint8)), "result frame")
        await wire.read_end(reader)
        await _refuse_unless_finite(header, target, waveform)
    except BaseException:
        store.release(header)
        raise
    store.commit(header, None if view is not None else target, waveform)
    return header


async def _refuse_unless_finite(header: Header, images: np.ndarray, waveform: np.ndarray | None) -> None:
    """Float payloads must hold numbers (uint8 ones always do): NaN or infinity is refused on arrival,
    as the tile route does, rather than saved as black or white pixels."""
    loop = asyncio.get_running_loop()
    if header.dtype != "uint8" and not await loop.run_in_executor(None, wire.all_finite, images):
        raise wire.Rejected(400, f"the {header.dtype} images of {units_text(header.unit, header.count)} hold values "
                                 "that are not finite numbers (NaN or infinity); check the worker's upstream nodes")
    if waveform is not None and not await loop.run_in_executor(None, wire.all_finite, waveform):
        raise wire.Rejected(400, f"the audio of {units_text(header.unit, header.count)} holds values that are not "
                                 "finite numbers (NaN or infinity); check the worker's upstream nodes")


async def _read_converting(reader, header: Header, out: np.ndarray) -> None:
    """Stream a raw payload into float32 ``out``, a megabyte at a time: float32 bytes land
    directly in place, other dtypes are converted chunk by chunk (uint8 scaled to [0, 1])."""
    dtype = np.dtype(wire.DTYPES[header.dtype])
    flat = out.reshape(-1)
    if dtype == np.float32:
        await wire.read_into(reader, memoryview(flat.view(np.uint8)), "result frame")
        return
    scale = np.float32(1 / 255.0) if dtype == np.uint8 else np.float32(1)
    leftover = b""
    done = 0
    while done < flat.size:
        want = min((flat.size - done) * dtype.itemsize - len(leftover), 1 << 20)
        chunk = await reader.read(want)
        if not chunk:
            raise wire.Rejected(400, "truncated result frame: fewer payload bytes than the header promises")
        data = leftover + chunk
        whole = len(data) // dtype.itemsize * dtype.itemsize
        values = np.frombuffer(data[:whole], dtype=dtype)
        np.multiply(values, scale, out=flat[done:done + len(values)], casting="unsafe")
        done += len(values)
        leftover = data[whole:]
