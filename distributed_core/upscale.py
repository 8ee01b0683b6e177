"""The master's side of a Distributed Tiled Upscale: the tile pool every participant pulls from, and
the workers' prompts that feed it.

When a prompt holding the node reaches the master, ``Upscales.plan`` (called from the prompt hook)
gives each enabled worker a prompt of what the node's model, conditioning and VAE need, with the node
in worker role, so that workers load their models while the master renders the image. The master's
node enlarges the image, cuts it into tiles and ``publish``es it with the batches of tiles
(tiles.batches: fixed by the grid and tile_batch); workers fetch the enlarged image once and then
``lease`` batches and deliver each rendered batch whole. The master renders batches from the same
pool. A lease that outlives its deadline, or whose worker's prompt fails, goes back to the pool;
once the pool is empty, an idle participant also renders a batch that another still holds, so a
frozen worker delays nothing. The first delivery of a batch wins; every batch depends only on its
inputs, so which participant rendered it changes nothing.

The Board is shared by the server's event loop (routes, supervision) and ComfyUI's execution thread
(the master's node); a Condition guards it. ``Upscales`` runs on the event loop.
"""
from __future__ import annotations

import asyncio
import collections
import enum
import logging
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import workflow
from .wire import Rejected, same_token
from .fleet import Unusable
from .watch import Watch
from .jobs import Ledger
from .plan import MASTER_ID
from . import tiles
from .tiles import Grid

log = logging.getLogger("comfyui-distributed")

MAX_HOLDERS = 2          # at most this many participants render one batch at once
OVERDUE = 2.0            # a batch held this many median batch times may be rendered by an idle participant too
CLIENT_ID = "comfyui-distributed"


class UpscaleState(enum.Enum):
    PLANNED = "planned"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass
class Lease:
    kind: str                # "batch" (render ``tiles``), "wait" (ask again soon), "done" (nothing left)
    batch: int = -1          # the batch's number in the pool
    tiles: tuple[int, ...] = ()


@dataclass
class Pool:
    """The tiles of one node of a job."""
    node: str
    grid: Grid | None = None
    params: dict = field(default_factory=dict)
    image: np.ndarray | None = None          # the enlarged batch, float32 (frames, h, w, c)
    batches: list[tuple[int, ...]] = field(default_factory=list)  # batch number -> its tiles
    pending: list[int] = field(default_factory=list)              # batch numbers nobody holds
    leases: dict[int, dict[str, tuple[float, float]]] = field(default_factory=dict)  # batch -> {who: (since, deadline)}
    durations: list[float] = field(default_factory=list)   # seconds from lease to delivery of finished batches
    results: dict[int, np.ndarray] = field(default_factory=dict)      # tile -> its rendered padded region
    rendered_by: dict[int, str] = field(default_factory=dict)         # tile -> participant

    @property
    def total(self) -> int:
        return len(self.grid) if self.grid is not None else 0

    def complete(self) -> bool:
        return self.grid is not None and len(self.results) == self.total

    def delivered(self, batch: int) -> bool:
        return self.batches[batch][0] in self.results


@dataclass
class WorkerShare:
    participant: str
    label: str
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    prompt_id: str = ""
    state: str = "waiting"   # waiting | queued | running | done | failed | cancelled
    error: str = ""
    dispatched: float = 0.0  # the fleet's clock when the worker accepted its prompt


@dataclass
class UpscaleJob:
    id: str
    prompt: dict                       # the prompt as submitted, for the workers' prompts
    nodes: list[str]
    config: Any
    master_renders: bool = True
    prompt_id: str = ""
    state: UpscaleState = UpscaleState.PLANNED
    error: str = ""
    notices: list[str] = field(default_factory=list)
    workers: dict[str, WorkerShare] = field(default_factory=dict)
    pools: dict[str, Pool] = field(default_factory=dict)
    finished_nodes: set[str] = field(default_factory=set)

    def summary(self) -> dict:
        """The panel's view, in the Collector jobs' shape: a unit is a tile. Read from any thread
        while the job runs: each dict is copied whole first (one step under the GIL)."""
        pools = list(self.pools.values())
        delivered = [list(p.rendered_by.values()) for p in pools]
        total = sum(p.total for p in pools)
        done = sum(len(d) for d in delivered)
        count: collections.Counter = collections.Counter(who for d in delivered for who in d)
        shares = [{"participant": MASTER_ID, "name": "master", "units": [], "done": count[MASTER_ID],
                   "state": "running" if self.state is UpscaleState.RUNNING else self.state.value,
                   "error": ""}]
        shares += [{"participant": w.participant, "name": w.label, "units": [], "done": count[w.participant],
                    "state": w.state, "error": w.error} for w in list(self.workers.values())]
        return {"job_id": self.id, "prompt_id": self.prompt_id, "state": self.state.value, "error": self.error,
                "notices": list(self.notices), "units": total, "done": done, "split": False, "kind": "tiles",
                "shares": shares}


class Board(Ledger):
    FAILED = UpscaleState.FAILED

    def __init__(self, on_change: Callable[[UpscaleJob], None] | None = None):
        super().__init__(on_change)
        self.on_end: Callable[[UpscaleJob], None] = lambda job: None

    def add(self, job: UpscaleJob) -> None:
        with self._cond:
            self._jobs[job.id] = job
            for node in job.nodes:
                job.pools.setdefault(node, Pool(node))

    def is_open(self, job_id: str) -> bool:
        return self.get(job_id) is not None

    def _release(self, job: UpscaleJob) -> None:
        for share in job.workers.values():  # one that never took part is withdrawn (see _ended)
            if share.state not in ("done", "failed"):
                share.state = ("done" if job.state is UpscaleState.DONE and share.state == "running"
                               else "cancelled")
        for pool in job.pools.values():
            pool.image = None
            pool.results = {}

    def end(self, job_id: str, state: UpscaleState, reason: str = "") -> UpscaleJob | None:
        job = super().end(job_id, state, reason)
        if job is None:
            return None
        if state is UpscaleState.DONE:
            tally = collections.Counter(who for p in job.pools.values() for who in p.rendered_by.values())
            labels = {w.participant: w.label for w in job.workers.values()} | {MASTER_ID: "master"}
            log.info("[Distributed] upscale job %s done: tiles rendered by %s", job_id[:8],
                     ", ".join(f"{labels.get(who, who)} {n}" for who, n in sorted(tally.items())))
        try:
            self.on_end(job)
        except Exception:  # noqa: BLE001
            log.error("[Distributed] ending upscale job %s", job_id[:8], exc_info=True)
        return job

    # --- what a worker's request may touch ----------------------------------------------------
    def _pool_for(self, job_id: str, node: str, token: str) -> tuple[UpscaleJob, Pool, str]:
        """Under the lock: the job, the node's pool and the participant the token was given to."""
        job = self._jobs.get(job_id)
        if job is None:
            if job_id in self._finished:
                raise Rejected(410, f"upscale job {job_id[:8]} has ended ({self._finished[job_id]})")
            raise Rejected(404, f"no upscale job {job_id[:8]} on this master")
        holder = None
        for share in job.workers.values():
            if same_token(token, share.token):
                holder = share
        if holder is None:
            raise Rejected(403, "the tile token does not belong to this job")
        if holder.state == "failed":
            raise Rejected(410, f"{holder.label} was dropped from this job: {holder.error}")
        pool = job.pools.get(node)
        if pool is None:
            raise Rejected(404, f"upscale job {job_id[:8]} has no node {node!r}")
        return job, pool, holder.participant

    def holder(self, job_id: str, node: str, token: str) -> str:
        with self._cond:
            return self._pool_for(job_id, node, token)[2]

    # --- the master's node -------------------------------------------------------------------
    def publish(self, job_id: str, node: str, image: np.ndarray, grid: Grid, params: dict,
                tile_batch: int) -> bool:
        """Make a node's enlarged image and its batches of tiles available; False when the job is
        not open here."""
        with self._cond:
            job = self._jobs.get(job_id)
            pool = job.pools.get(node) if job else None
            if pool is None:
                return False
            pool.image, pool.grid, pool.params = image, grid, dict(params)
            pool.batches = tiles.batches(len(grid), tile_batch)
            pool.pending = list(range(len(pool.batches)))
            pool.leases, pool.results, pool.rendered_by, pool.durations = {}, {}, {}, []
            job.state = UpscaleState.RUNNING
            self._cond.notify_all()
        self._notify(job)
        return True

    def image(self, job_id: str, node: str, token: str) -> tuple[np.ndarray, Grid, dict] | None:
        """The enlarged image for a worker, or None while the master has not published it."""
        with self._cond:
            job, pool, participant = self._pool_for(job_id, node, token)
            if pool.image is None or pool.grid is None:
                return None
            share = job.workers.get(participant)
            if share is not None and share.state in ("waiting", "queued"):
                share.state = "running"
            return pool.image, pool.grid, pool.params

    def lease(self, job_id: str, node: str, participant: str, seconds: float,
              token: str | None = None) -> Lease:
        """The next batch for ``participant`` to render. While batches are pending, the lowest one;
        then a batch that others hold (at most MAX_HOLDERS at once) for longer than OVERDUE times
        the median batch so far, the longest-held first: a frozen or slow holder then delays the
        job by about that much, while a holder about to deliver is left to it."""
        now = time.monotonic()
        with self._cond:
            if token is not None:
                job, pool, participant = self._pool_for(job_id, node, token)
            else:
                job = self._jobs.get(job_id)
                pool = job.pools.get(node) if job else None
                if pool is None:
                    raise Rejected(410, f"upscale job {job_id[:8]} has ended")
            if pool.grid is None:
                return Lease("wait")
            if pool.complete():
                return Lease("done")
            self._expire(pool, now)
            if pool.pending:
                batch = pool.pending.pop(0)
            else:
                overdue = OVERDUE * float(np.median(pool.durations)) if pool.durations else float("inf")
                held = [(since, b) for b, holders in pool.leases.items()
                        for since in [min(s for s, _d in holders.values())]
                        if not pool.delivered(b) and participant not in holders and len(holders) < MAX_HOLDERS
                        and now - since > overdue]
                if not held:
                    return Lease("wait")
                batch = min(held)[1]
            pool.leases.setdefault(batch, {})[participant] = (now, now + seconds)
            return Lease("batch", batch, pool.batches[batch])

    @staticmethod
    def _give_back(pool: Pool, batch: int) -> None:
        """Under the lock: a batch that nobody holds any more is pending again unless delivered."""
        del pool.leases[batch]
        if not pool.delivered(batch) and batch not in pool.pending:
            pool.pending.append(batch)
            pool.pending.sort()

    def _expire(self, pool: Pool, now: float) -> None:
        for batch in list(pool.leases):
            holders = pool.leases[batch]
            for who in [w for w, (_since, deadline) in holders.items() if deadline < now]:
                del holders[who]
            if not holders:
                self._give_back(pool, batch)

    def complete(self, job_id: str, node: str, batch: int, participant: str, pixels: np.ndarray) -> bool:
        """Record a rendered batch, (tiles, h, w, c) in the batch's tile order; False when it had
        arrived already (the first delivery wins)."""
        with self._cond:
            job = self._jobs.get(job_id)
            pool = job.pools.get(node) if job else None
            if pool is None:
                raise Rejected(410, f"upscale job {job_id[:8]} has ended")
            if pool.grid is None or not 0 <= batch < len(pool.batches):
                raise Rejected(400, f"batch {batch} is not a batch of this job")
            indices = pool.batches[batch]
            if len(pixels) != len(indices):
                raise Rejected(400, f"batch {batch} holds {len(indices)} tiles, not {len(pixels)}")
            held = pool.leases.pop(batch, {})
            if batch in pool.pending:
                pool.pending.remove(batch)
            if pool.delivered(batch):
                return False
            if participant in held:
                pool.durations.append(time.monotonic() - held[participant][0])
            for index, tile in zip(indices, pixels):
                pool.results[index] = tile
                pool.rendered_by[index] = participant
            self._cond.notify_all()
        self._notify(job)
        return True

    def expected_shape(self, job_id: str, node: str, token: str, batch: int) -> tuple[str, tuple]:
        """(participant, (tiles, h, w, c)) that a worker's batch ``batch`` must have."""
        with self._cond:
            _job, pool, participant = self._pool_for(job_id, node, token)
            if pool.grid is None or not 0 <= batch < len(pool.batches):
                raise Rejected(400, f"batch {batch} is not a batch of this job")
            height, width = pool.grid.padded_shape
            channels = int(pool.image.shape[-1]) if pool.image is not None else 3
            return participant, (len(pool.batches[batch]), height, width, channels)

    def notice(self, job_id: str, participant: str, text: str) -> None:
        """Add what ``participant`` reports to the job's notices (shown in the panel) and to the
        log, once."""
        def change(job: UpscaleJob) -> None:
            share = job.workers.get(participant)
            line = f"{share.label if share else 'master'}: {text}"
            if line not in job.notices:
                job.notices.append(line)
                log.warning("[Distributed] upscale job %s: %s", job_id[:8], line)
        self.update(job_id, change)

    def release(self, job_id: str, participant: str, reason: str) -> None:
        """A worker is gone: its leases go back to the pool, and it gets no more batches."""
        def change(job: UpscaleJob) -> None:
            share = job.workers.get(participant)
            if share is not None and share.state not in ("done", "failed"):
                share.state, share.error = "failed", reason
                job.notices.append(f"{share.label} failed: {reason}")
                log.warning("[Distributed] %s failed in upscale job %s: %s; its batches go back to the pool",
                            share.label, job_id[:8], reason)
            for pool in job.pools.values():
                for batch in list(pool.leases):
                    pool.leases[batch].pop(participant, None)
                    if not pool.leases[batch]:
                        self._give_back(pool, batch)
        self.update(job_id, change)

    def wait(self, job_id: str, node: str, timeout: float) -> tuple[int, int, bool]:
        """Wait up to ``timeout`` for a change; (tiles done, tiles in all, job still open)."""
        with self._cond:
            job = self._jobs.get(job_id)
            pool = job.pools.get(node) if job else None
            if pool is not None and not pool.complete():
                self._cond.wait(timeout)
                job = self._jobs.get(job_id)
                pool = job.pools.get(node) if job else None
            if pool is None:
                return 0, 0, False
            return len(pool.results), pool.total, True

    def workers_left(self, job_id: str) -> bool:
        with self._cond:
            job = self._jobs.get(job_id)
            return job is not None and any(s.state not in ("failed", "done", "cancelled")
                                           for s in job.workers.values())

    def results(self, job_id: str, node: str) -> dict[int, np.ndarray]:
        with self._cond:
            job = self._jobs.get(job_id)
            pool = job.pools.get(node) if job else None
            if pool is None or not pool.complete():
                raise Rejected(410, f"upscale job {job_id[:8]} ended before all its tiles arrived")
            return dict(pool.results)

    def node_done(self, job_id: str, node: str) -> None:
        """The master has blended a node; the job ends with its last node."""
        job = self.update(job_id, lambda j: j.finished_nodes.add(node))
        if job is not None and set(job.nodes) <= job.finished_nodes:
            self.end(job_id, UpscaleState.DONE)


class Upscales:
    """Plans upscale jobs at submission and runs the workers' side of them on the event loop, with
    the workers of the fleet (fleet.py)."""

    def __init__(self, fleet):
        self.fleet = fleet
        self.board = Board()
        self.board.on_end = self._ended
        self.loop: asyncio.AbstractEventLoop | None = None

    # --- planning (synchronous, inside POST /prompt) ------------------------------------------
    def rewrite(self, json_data: dict, prompt: dict, targets: list | None, pending: list | None) -> dict:
        """The prompt hook's part for tiled upscales: every fresh upscale node in master role, when
        there is a worker to share with; the prompt as it is otherwise (the node then renders every
        tile itself)."""
        nodes = workflow.fresh_upscales(prompt)
        if nodes and targets is not None:
            nodes = workflow.reached(prompt, nodes, targets)
        if not nodes:
            return json_data
        config = self.fleet.config()
        workers = self.fleet.usable(config)
        if self.fleet.is_worker_instance(config) or not workers:
            return json_data
        try:
            workflow.check_upscales(prompt, nodes)
        except workflow.WorkflowError as exc:
            json_data["prompt"] = workflow.with_fields(prompt, nodes, {"role": "error", "error": str(exc)})
            return json_data
        job = UpscaleJob(id=uuid.uuid4().hex, prompt=prompt, nodes=nodes, config=config,
                         master_renders=config.master.enabled)
        for w in workers:
            job.workers[w.id] = WorkerShare(w.id, w.label)
        rewritten = dict(prompt)
        for nid in nodes:
            rewritten[nid] = workflow._with_field(prompt[nid], {"role": "master", "job": job.id, "node": nid,
                                                                "lease": config.settings.job_timeout,
                                                                "master_renders": job.master_renders})
        self.board.add(job)
        if pending is not None:
            pending.append((self, job.id))
        else:
            asyncio.get_running_loop().call_soon(lambda: self.fleet.spawn(self.start(job.id, "")))
        json_data["prompt"] = rewritten
        return json_data

    def drop(self, job_id: str, reason: str) -> None:
        """The master did not take the prompt that the job was planned for."""
        self.board.end(job_id, UpscaleState.CANCELLED, reason)

    # --- running a job -----------------------------------------------------------------------
    async def start(self, job_id: str, prompt_id: str) -> None:
        """The master accepted the prompt of ``job_id``: send the workers theirs."""
        self.loop = asyncio.get_running_loop()
        job = self.board.update(job_id, lambda j: setattr(j, "prompt_id", prompt_id))
        if job is None:
            return
        for share in list(job.workers.values()):
            self.fleet.spawn(self._run_worker(job_id, share))
        if prompt_id:
            self.fleet.spawn(self._watch_master(job_id, prompt_id))

    async def _run_worker(self, job_id: str, share: WorkerShare) -> None:
        job = self.board.get(job_id)
        if job is None:
            return
        worker = job.config.worker(share.participant)
        fields = {"job": job_id, "token": share.token, "timeout": job.config.settings.job_timeout}
        prompt = workflow.upscale_worker_prompt(job.prompt, job.nodes, fields)
        try:
            client, share.prompt_id = await self.fleet.send(worker, prompt, job.config, CLIENT_ID)
        except Unusable as exc:
            self.board.release(job_id, share.participant, str(exc))
            return
        share.dispatched = self.fleet.clock.now()
        self.board.update(job_id, lambda j: setattr(share, "state", "queued")
                          if share.state == "waiting" else None)
        if not self.board.is_open(job_id):  # ended while we were dispatching
            await self.fleet.withdraw(worker.url, share.prompt_id, share.label)
            return
        await self._supervise(job_id, share, client, job.config.settings.job_timeout)

    async def _supervise(self, job_id: str, share: WorkerShare, client, timeout: float) -> None:
        """Watch a worker's prompt while the job is open (the fleet's one way of watching worker
        prompts): an error, a lost prompt, a dead process or silence for ``timeout`` seconds puts
        its tiles back in the pool."""
        watched = Watch(client, share.prompt_id, share.dispatched, job_id, lambda: self.board.is_open(job_id),
                        lambda: False, relay_token=share.token)
        outcome, why = await self.fleet.watch(watched, timeout)
        if outcome == "finished":
            self.board.update(job_id, lambda j: setattr(share, "state", "done"))
            self.board.release(job_id, share.participant, "its prompt ended")  # no-op once done
        elif outcome != "closed":
            self.board.release(job_id, share.participant, why)

    async def _watch_master(self, job_id: str, prompt_id: str) -> None:
        """End the job when the master's own prompt ends without the node finishing it (an error
        upstream, an interrupt, the prompt deleted from the queue)."""
        fleet = self.fleet
        entry = await fleet.watcher.prompt_end(fleet.client(fleet.own_url()), prompt_id, fleet.clock.now(), job_id,
                                               lambda: self.board.is_open(job_id))
        self.board.end(job_id, UpscaleState.CANCELLED,
                       "the master's prompt ended before the upscale finished" if entry
                       else "the prompt was removed from the master's queue")

    def _ended(self, job: UpscaleJob) -> None:
        """Called from any thread when a job ends: the prompts of workers that were still at work
        for it (all of them if it did not finish; those that never fetched the image if it did)
        are taken back, out of their queue or interrupted."""
        if self.loop is None:
            return
        for share in job.workers.values():
            if share.prompt_id and share.state == "cancelled":
                url = job.config.worker(share.participant).url
                self.loop.call_soon_threadsafe(
                    lambda u=url, p=share.prompt_id, n=share.label: self.fleet.spawn(self.fleet.withdraw(u, p, n)))


