"""Jobs on the master and the results that arrive for them.

Results arrive on the server's event loop; the Collector waits for them on ComfyUI's execution
thread. A Condition joins the two. Memory is bounded: results for jobs that the master has not
reached yet are refused with "retry later" once ``budget_bytes`` is held, except for the oldest
job, so the job that runs now can always finish.
"""
from __future__ import annotations

import collections
import enum
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .wire import Header

FINISHED_MEMORY = 256  # how many finished job ids are remembered, to answer late results with 410


class JobState(enum.Enum):
    PLANNED = "planned"      # prompt rewritten, waiting for the master to accept it
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ResultRejected(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


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
    prompt_id: str = ""
    dispatched: float = 0.0
    state: str = "waiting"    # waiting | queued | running | done | failed
    error: str = ""


@dataclass
class Job:
    id: str
    collectors: list[str]
    units: list[int]                              # every unit, in output order
    split: bool = False                           # units are global batch indices, shared out in chunks
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    prompt_id: str = ""
    state: JobState = JobState.PLANNED
    created: float = field(default_factory=time.monotonic)
    shares: dict[str, Share] = field(default_factory=dict)
    # (collector, first unit) -> (units covered, images); a chunk covers a run of units
    results: dict[tuple[str, int], tuple[int, Any]] = field(default_factory=dict)
    covered: dict[str, set[int]] = field(default_factory=dict)
    arrived: dict[int, float] = field(default_factory=dict)  # first unit of a chunk -> when it came
    held_bytes: int = 0
    error: str = ""
    notices: list[str] = field(default_factory=list)  # failures that were recovered from
    taken: set[str] = field(default_factory=set)       # Collectors that have their batch

    def all_taken(self) -> bool:
        return set(self.collectors) <= self.taken

    def summary(self) -> dict:
        """What the panel shows of a job: each share and how many of its units have arrived."""
        first = self.collectors[0]
        return {
            "job_id": self.id, "prompt_id": self.prompt_id, "state": self.state.value,
            "error": self.error, "notices": list(self.notices), "units": len(self.units),
            "done": len(self.units) if first in self.taken else self.delivered(first), "split": self.split,
            "shares": [{"participant": s.participant, "name": s.label, "units": list(s.units),
                        "done": sum(1 for u in s.units if self.has(first, u) or first in self.taken),
                        "state": s.state, "error": s.error} for s in self.shares.values()],
        }

    def delivered(self, collector: str) -> int:
        return len(self.covered.get(collector, ()))

    def has(self, collector: str, unit: int) -> bool:
        return unit in self.covered.get(collector, ())

    def missing_units(self, units: list[int]) -> list[int]:
        return [u for u in units if any(not self.has(c, u) for c in self.collectors)]

    def record(self, collector: str, first: int, count: int, value: Any, nbytes: int = 0) -> None:
        self.results[(collector, first)] = (count, value)
        self.covered.setdefault(collector, set()).update(range(first, first + count))
        self.arrived[first] = time.monotonic()
        self.held_bytes += nbytes


class JobStore:
    def __init__(self, budget_bytes: int = 8 << 30, on_change: Callable[[Job], None] | None = None):
        self.budget_bytes = budget_bytes
        self.on_change = on_change or (lambda job: None)
        self._cond = threading.Condition()
        self._jobs: dict[str, Job] = {}
        self._finished: collections.OrderedDict[str, str] = collections.OrderedDict()

    # --- bookkeeping -------------------------------------------------------------------------
    def add(self, job: Job) -> None:
        with self._cond:
            self._jobs[job.id] = job

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def active(self) -> list[Job]:
        with self._cond:
            return list(self._jobs.values())

    def held_bytes(self) -> int:
        with self._cond:
            return sum(j.held_bytes for j in self._jobs.values())

    def update(self, job_id: str, change: Callable[[Job], None]) -> Job | None:
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            change(job)
            self._cond.notify_all()
        self.on_change(job)
        return job

    def end(self, job_id: str, state: JobState, error: str = "") -> Job | None:
        """Finish a job and drop what it holds; later results for it are answered 410."""
        with self._cond:
            job = self._jobs.pop(job_id, None)
            if job is None:
                return None
            if job.state is not JobState.FAILED:  # a failure stays the reason it ended
                job.state = state
            job.error = job.error or error
            job.results.clear()
            job.held_bytes = 0
            self._finished[job_id] = state.value
            while len(self._finished) > FINISHED_MEMORY:
                self._finished.popitem(last=False)
            self._cond.notify_all()
        self.on_change(job)
        return job

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
                    raise ResultRejected(410, f"job {header.job} has already ended "
                                              f"({self._finished[header.job]}); result discarded")
                raise ResultRejected(404, f"no job {header.job} on this master")
            if not secrets.compare_digest(header.token, job.token):
                raise ResultRejected(403, "wrong token for this job")
            covers = range(header.unit, header.unit + header.count)
            if (header.collector not in job.collectors or not set(covers) <= set(job.units)
                    or (not job.split and header.count != 1)):
                raise ResultRejected(400, f"job {job.id} has no units {header.unit}..{header.unit + header.count - 1} "
                                          f"for collector {header.collector}")
            if job.state not in (JobState.PLANNED, JobState.RUNNING):
                raise ResultRejected(410, f"job {job.id} is {job.state.value}; result discarded")
            if any(job.has(header.collector, u) for u in covers):
                raise ResultRejected(409, f"units from {header.unit} of job {job.id} were delivered already")
            oldest = min(self._jobs.values(), key=lambda j: j.created)
            held = sum(j.held_bytes for j in self._jobs.values())
            if job is not oldest and held + header.payload_size > self.budget_bytes:
                raise ResultRejected(503, "the master holds its result budget for earlier jobs; retry later")
            return job

    def put(self, header: Header, value: Any) -> None:
        self.check(header)
        self.update(header.job, lambda job: job.record(header.collector, header.unit, header.count, value,
                                                       header.payload_size))

    def put_local(self, job_id: str, collector: str, first: int, count: int, value: Any) -> None:
        """The master's own share: no frame, no budget (it exists already)."""
        self.update(job_id, lambda job: job.record(collector, first, count, value))

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
        """The results for one Collector in unit order, handed over (the store lets go of them)."""
        with self._cond:
            job = self._jobs[job_id]
            order = {u: i for i, u in enumerate(job.units)}
            mine = sorted((k for k in job.results if k[0] == collector), key=lambda k: order[k[1]])
            values = [job.results.pop(k)[1] for k in mine]
            job.taken.add(collector)
            job.held_bytes = sum(getattr(v, "nbytes", 0) for _c, v in job.results.values())
            return values
