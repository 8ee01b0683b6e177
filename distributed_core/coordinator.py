"""The master's side of a job: plan it when a prompt arrives, dispatch the workers' prompts, watch
them, move the units of a worker that fails to one that works, and end the job with its prompt.

One owner for a job's state: the server's event loop. ``rewrite`` runs there too (ComfyUI calls it
synchronously from its POST /prompt handler, so it only plans and rewrites). The Collector on
ComfyUI's execution thread only waits for results; whatever it needs done (its own images put in
place, the job ended) it asks of the loop through ``from_thread``. A job ends in one way, ``end``.

Who can be reached is known from one background check per instance (reach.Reachability); planning,
supervision and GET /distributed/status all read it. Supervision asks each worker only for the
history of our own prompt, the share nearest the head of a worker's queue most often, and reads a
worker's whole queue at most every QUEUE_MAX_AGE seconds, shared by all its shares.
"""
from __future__ import annotations

import asyncio
import contextvars
import hashlib
import inspect
import logging
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import aiohttp

from . import audio
from . import config as config_file
from . import doctor, plan, upscale, workflow
from .vault import Vault
from .client import InstanceClient, InstanceError, history_error
from .config import Config, Loaded, Worker
from .jobs import Job, JobFailed, JobState, JobStore, Share
from .reach import Clock, Reachability

log = logging.getLogger("comfyui-distributed")

POLL_SECONDS = 1.0      # how often the share nearest the head of a queue reads its prompt's history
MAX_POLL_SECONDS = 15.0  # ...and the share furthest back
QUEUE_MAX_AGE = 10.0    # a worker's whole queue (to find a prompt it lost) is read at most this often
REFUSALS_MEAN_GONE = 3  # checks in a row refused: the worker's process has died
FINISHED_GRACE = 5.0    # results are posted before a prompt ends: a finished prompt gets this long more
CLIENT_ID = "comfyui-distributed"

# Jobs planned during the POST /prompt request being handled; the middleware activates or drops them.
submitted: contextvars.ContextVar[list | None] = contextvars.ContextVar("distributed_submitted", default=None)
# Why the prompt hook refused the POST /prompt being handled; the middleware answers with it.
refused: contextvars.ContextVar[list | None] = contextvars.ContextVar("distributed_refused", default=None)


@dataclass
class JobPlan:
    """What the coordinator keeps beside a job: the original prompt, the config it was planned
    with and, in split mode, what the participants' speeds are learned under."""
    prompt: dict
    collectors: list[str]
    config: Config
    signature: str = ""
    started: float = 0.0
    master_done: float = 0.0  # wall-clock time the master's own share was ready (split mode)


@dataclass
class _Queue:
    """One instance's queue as last read: prompt ids running or pending, and when the request
    that read them was sent."""
    read_at: float = float("-inf")
    tried_at: float = float("-inf")
    ids: frozenset = frozenset()
    running: frozenset = frozenset()
    reading: asyncio.Future | None = None


@dataclass(eq=False)
class Watch:
    """One prompt that a worker runs for us, under watch (``Coordinator.watch``): Collector
    shares, spread prompts and tile workers alike."""
    client: InstanceClient
    prompt_id: str
    dispatched: float                   # the coordinator's clock when the worker accepted it
    wake_key: str                       # ``result_arrived(wake_key)`` makes the watch look at once
    is_open: Callable[[], bool]         # whoever sent it still waits for it
    delivered: Callable[[], bool]       # what it was sent for has reached the master
    grace: float | None = None          # a finished prompt whose results have not arrived gets this
    #                                     long more (they are posted before it ends); None: a prompt
    #                                     that ends without an error is done with
    on_running: Callable[[], None] | None = None  # told when a queue read shows it running


class Coordinator:
    def __init__(self, store: JobStore, load_config: Callable[[], Loaded],
                 own_address: Callable[[], tuple[str, int]], input_dir: Callable[[], Path] | None = None,
                 loopback_only: Callable[[], bool] = lambda: False, partial_execution: bool = False,
                 client_factory: Callable[[str], Any] | None = None, clock: Clock | None = None):
        self.store = store
        self.load_config = load_config
        self.own_address = own_address
        self.input_dir = input_dir            # the master's input folder, for loaders' files
        self.loopback_only = loopback_only    # the master listens on 127.0.0.1 alone
        self.partial_execution = partial_execution  # ComfyUI runs only partial_execution_targets
        self.clock = clock or Clock()
        self._client_factory = client_factory  # tests give a fake; else InstanceClient over HTTP
        self.api_features: dict = {}  # what each instance's HTTP API offers (see InstanceClient)
        self.plans: dict[str, JobPlan] = {}
        self.tasks: set[asyncio.Task] = set()
        self.wakeups: dict[str, asyncio.Event] = {}
        self.watching: dict[str, list[Watch]] = {}  # instance URL -> prompts watched there, oldest first
        self.queues: dict[str, _Queue] = {}
        self.vault = Vault()  # result tokens of worker-role prompts sent to this instance
        self.reach = Reachability(self._watched_instances, self.client, self.clock)
        self._throughput: plan.Throughput | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's, for calls from other threads
        self._session: aiohttp.ClientSession | None = None
        # Prompts that hold no Collector go here (the spread queue, distributed_core/spread.py).
        self.plain_prompt_hook: Callable[[dict], dict] | None = None
        self.upscales = upscale.Upscales(self)  # Distributed Tiled Upscale jobs (see upscale.py)
        # the spread queue (spread.py): its Dispatcher, which owns the claims, once the glue has
        # installed it on ComfyUI's queue; else why it is not there
        self.spread = None
        self.spread_unsupported = "the spread queue was not set up"
        self.object_infos = doctor.ObjectInfoCache()  # each worker's /object_info, for a short while

    # --- helpers ---------------------------------------------------------------------------------
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    def client(self, url: str) -> InstanceClient:
        if self._client_factory is not None:
            return self._client_factory(url)
        return InstanceClient(self.session(), url, self.api_features)

    def own_url(self) -> str:
        host, port = self.own_address()
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def master_url_for(self, config: Config, worker: Worker) -> str:
        """The address a worker uses to reach this master: configured, or loopback for local workers,
        or the address of the interface that routes to a remote worker."""
        _host, port = self.own_address()
        host = config.master.host
        if not host:
            host = "127.0.0.1" if worker.is_local else _route_address(worker.host)
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def begin(self) -> None:
        """On the server's loop once it runs: start the reachability checks."""
        self.loop = asyncio.get_running_loop()
        self.reach.start()

    def _watched_instances(self) -> list[tuple[str, bool]]:
        """What the reachability checks watch: this master and every worker of the current config
        (none on an instance that is itself a worker)."""
        config = self.load_config().config
        if self.is_worker_instance(config):
            return []
        return [(self.own_url(), True)] + [(w.url, w.enabled) for w in config.workers]

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("[Distributed] internal error", exc_info=task.exception())

    async def settle(self) -> None:
        """Until no task of ours is left running (tests)."""
        while self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)

    def from_thread(self, fn: Callable, *args, timeout: float = 60.0) -> Any:
        """Run ``fn(*args)`` (a function or coroutine function) on the event loop and wait for its
        result: the only way ComfyUI's execution thread acts on a job."""
        async def call():
            result = fn(*args)
            return await result if inspect.isawaitable(result) else result
        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout)

    def is_worker_instance(self, config: Config) -> bool:
        """This instance is one of the config's local workers: it runs what it is sent, nothing more."""
        _host, port = self.own_address()
        return port != config.master.port and any(w.is_local and w.port == port for w in config.workers)

    # --- planning (synchronous, inside POST /prompt) --------------------------------------------
    def rewrite(self, json_data: Any) -> Any:
        """ComfyUI's prompt hook. A prompt that holds a Collector but cannot be planned is refused
        with the reason (POST /prompt answers 400 before anything renders). A prompt too malformed
        to be a prompt at all is passed on untouched, with nothing registered: ComfyUI's own
        validation then says what is wrong with it. A prompt without a Collector is not touched."""
        try:
            return self._rewrite(json_data)
        except Exception as exc:  # noqa: BLE001 - never raise inside ComfyUI's request
            prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
            if _malformed(prompt) or not workflow.nodes_of(prompt, workflow.COLLECTOR):
                log.debug("[Distributed] prompt not planned", exc_info=True)
                return json_data
            log.error("[Distributed] a prompt could not be planned", exc_info=True)
            return refuse(json_data, f"the Multi-GPU Collector's job could not be planned "
                                     f"({type(exc).__name__}: {exc}); nothing was queued")

    def _rewrite(self, json_data: Any) -> Any:
        if not isinstance(json_data, dict):
            return json_data
        try:
            self.begin()  # normally started with the server already
        except RuntimeError:
            pass  # no running loop (tests that call the hook directly)
        kind, prompt = workflow.screen(json_data.get("prompt"))
        if kind == "refused":
            return refuse(json_data, prompt)
        if kind == "dispatch":  # a master's prompt for this instance as a worker: run it as it is
            json_data["prompt"] = self.vault.seal(prompt)
            return json_data
        if kind == "stripped":
            log.warning("[Distributed] a submitted prompt carried %s inputs, which only the master's own "
                        "rewrite sets; they were dropped", workflow.FIELD)
            json_data["prompt"] = prompt
        if workflow.fresh_upscales(prompt):  # tiled upscales: planned apart (distributed_core/upscale.py)
            loaded = self.load_config()
            prompt = json_data["prompt"] = self.upscales.plan(json_data, prompt, loaded.config, submitted.get())
        collectors = workflow.fresh_collectors(prompt)
        targets = json_data.get("partial_execution_targets")
        if collectors and self.partial_execution and isinstance(targets, list):
            collectors = workflow.reached(prompt, collectors, targets)  # plan only what will run
        if not collectors:
            return self.plain_prompt_hook(json_data) if self.plain_prompt_hook else json_data
        if _malformed(prompt):
            return json_data
        loaded = self.load_config()
        if loaded.error:
            log.warning("[Distributed] %s; running with defaults", loaded.error)
        config = loaded.config
        if self.is_worker_instance(config):
            return json_data
        try:
            job, own, fanned = self.plan_job(prompt, collectors, config)
        except (plan.PlanError, workflow.WorkflowError) as exc:
            return refuse(json_data, f"Multi-GPU Collector {', '.join(collectors)}: {exc}")
        if job is None:
            return json_data  # nobody else takes part: the Collector passes its images through
        chunks = plan.chunks_of(own) if job.split else [[u, 1] for u in own]
        seeds = [0] * len(chunks) if job.split else own
        rewritten = workflow.master_prompt(prompt, collectors, {"job": job.id}, chunks, seeds)
        # Registered only once everything above has worked, so a failure leaves nothing behind.
        self.store.add(job)
        self.plans[job.id] = JobPlan(prompt, fanned, config, signature=job_signature(job, prompt, fanned))
        for notice in job.notices:
            log.warning("[Distributed] job %s: %s", job.id[:8], notice)
        json_data["prompt"] = rewritten
        pending = submitted.get()
        if pending is not None:
            pending.append(job.id)
        else:  # called outside our middleware (should not happen): dispatch without waiting
            asyncio.get_running_loop().call_soon(lambda: self.spawn(self.start(job.id, "")))
        return json_data

    def plan_job(self, prompt: dict, collectors: list[str], config: Config) -> tuple[Job | None, list[int], list[str]]:
        """The job for a prompt under ``config``: (job, the master's units, the Collectors the
        workers render for), or (None, ...) when the master alone takes part. Workers that the
        reachability checks know to be down are planned out: their units (seed slots) stay and go
        to the others. A worker with no answer yet is planned in; if it refuses its prompt, its
        units fail over like any failed share's. Raises PlanError or WorkflowError."""
        slots = plan.slots(config)
        fanned = workflow.layout(prompt, collectors).fanned  # the Collectors workers render for
        batch = workflow.split_batch(prompt, fanned)
        workflow.check_audio(prompt, collectors, fanned, split=batch is not None)
        if len(slots) == 1 and slots[0].participant == plan.MASTER_ID:
            return None, [], fanned
        workers = {w.id: w for w in config.workers}
        left_out = {s.participant: self.reach.why(workers[s.participant].url) for s in slots
                    if s.participant != plan.MASTER_ID and self.reach.is_down(workers[s.participant].url)}
        available = [s.participant for s in slots if s.participant not in left_out]
        labels = {w.id: w.label for w in config.workers} | {plan.MASTER_ID: "master"}
        if not available:
            raise plan.PlanError("the master is disabled and no enabled worker can be reached: "
                                 + "; ".join(f"{labels[p]}: {why}" for p, why in left_out.items())
                                 + ". Start the workers (Distributed panel) or enable the master.")
        if batch is None:
            job, own = self._plan_multiply(slots, available, labels)
        else:
            job, own = self._plan_split(prompt, fanned, batch, available, labels)
        job.collectors = fanned
        job.audio = {c for c in fanned if workflow.takes_audio(prompt, c)}
        for share in job.shares.values():
            share.url = workers[share.participant].url if share.participant in workers else ""
        for participant, why in left_out.items():
            took = "its seed slot goes to the others" if batch is None else "its part of the batch goes to the others"
            job.notices.append(f"{labels[participant]} ({workers[participant].url}) was left out, "
                               f"unreachable: {why}; {took}")
        return job, own, fanned

    def _plan_multiply(self, slots, available, labels) -> tuple[Job, list[int]]:
        """Every participant renders the whole workflow with its own seed slot."""
        assignment = plan.assign({s.participant: [s.unit] for s in slots}, available)
        job = Job(id=uuid.uuid4().hex, collectors=[], units=[s.unit for s in slots])
        for participant, units in assignment.items():
            job.shares[participant] = Share(participant, labels[participant], units)
        return job, assignment.get(plan.MASTER_ID, [])

    def _plan_split(self, prompt: dict, fanned: list[str], batch: int, available: list[str],
                    labels: dict[str, str]) -> tuple[Job, list[int]]:
        """One batch divided by index: one contiguous share per participant, in one prompt, in
        proportion to the speeds learned for this workflow (equal when none are known yet)."""
        rates = self.throughput()
        sig = plan.signature(prompt, workflow.upstream(prompt, fanned))
        shares = plan.split_units(list(range(batch)), [(p, rates.rate(sig, p)) for p in available])
        job = Job(id=uuid.uuid4().hex, collectors=[], units=list(range(batch)), split=True)
        for participant, units in shares.items():
            job.shares[participant] = Share(participant, labels[participant], units)
        return job, shares.get(plan.MASTER_ID, [])

    def throughput(self) -> plan.Throughput:
        if self._throughput is None:
            self._throughput = plan.Throughput(config_file.save_path().with_name("throughput.json"))
        return self._throughput

    # --- the Collector's requests (made from the execution thread through from_thread) ---------
    async def local_share(self, job_id: str, collector: str, chunks: list, arrays: list,
                          sounds: list | None = None) -> None:
        """The master's own images, and with them their audio (one audio.Sound per chunk, or None
        when the Collector's audio input is not connected): each chunk's rows are claimed here,
        filled off the loop, then recorded. Raises JobFailed when the job has ended."""
        loop = asyncio.get_running_loop()
        for (first, count), images, sound in zip(chunks, arrays, sounds or [None] * len(chunks)):
            view = self.store.place_local(job_id, collector, first, count, images.shape)
            if view is not None:
                await loop.run_in_executor(None, _copy, view, images)
            self.store.record_local(job_id, collector, first, count, None if view is not None else images, sound)
        job = self.store.get(job_id)
        if job is not None and plan.MASTER_ID in job.shares:
            self.store.update(job_id, lambda j: setattr(j.shares[plan.MASTER_ID], "state", "done"))
        job_plan = self.plans.get(job_id)
        if job_plan is not None:
            job_plan.master_done = time.time()  # its speed is learned in watch_master

    def collected(self, job_id: str, collector: str) -> tuple[list, list | None, list[str]]:
        """One Collector's batch handed over; the job ends once every Collector has its own.
        Returns (the batch's parts, its audio parts in the same order or None when the
        Collector's audio input is not connected, the job's notices). Audio parts that cannot be
        joined fail the job (JobFailed), naming who sent which format."""
        sounds = self.store.take_sounds(job_id, collector)
        try:
            if sounds is not None:
                audio.check(sounds)
        except audio.AudioError as exc:
            message = f"collector {collector}: {exc}"
            self.end(job_id, JobState.FAILED, message)
            raise JobFailed(message) from None
        parts = self.store.take(job_id, collector)
        job = self.store.get(job_id)
        notices = list(job.notices) if job is not None else []
        if job is None or job.all_taken():
            self.end(job_id, JobState.DONE)
        return parts, sounds, notices

    # --- ending a job ------------------------------------------------------------------------------
    def end(self, job_id: str, state: JobState, error: str = "") -> Job | None:
        """The one way a job ends (on the loop): ended in the store, its plan and wake-ups dropped,
        its watchers woken so that they stop, and every worker prompt that may still run for it
        withdrawn. A share being dispatched at this moment withdraws its prompt itself once it
        has its id (see run_share)."""
        self.plans.pop(job_id, None)
        event = self.wakeups.pop(job_id, None)
        if event is not None:
            event.set()
        job = self.store.get(job_id)
        outstanding = [] if job is None else [
            s for s in list(job.shares.values())
            if s.participant != plan.MASTER_ID and s.prompt_id and s.state not in ("done", "failed")
            and (state is not JobState.DONE or job.missing_units(s.units))]
        job = self.store.end(job_id, state, error)
        if job is None:
            return None
        if state is not JobState.DONE:
            log.info("[Distributed] job %s %s: %s", job_id[:8], job.state.value, job.error or error)
        for share in outstanding:
            self.spawn(self.withdraw(share))
        return job

    async def withdraw(self, share: Share) -> None:
        try:
            await self.client(share.url).withdraw(share.prompt_id)
        except InstanceError as exc:
            log.info("[Distributed] could not withdraw %s's prompt: %s", share.label, exc)

    def drop(self, job_id: str, reason: str) -> None:
        self.upscales.drop(job_id, reason)
        self.end(job_id, JobState.CANCELLED, reason)

    async def cancel(self, job_id: str, reason: str) -> None:
        self.end(job_id, JobState.CANCELLED, reason)

    def finish(self, job_id: str, state: JobState, error: str = "") -> None:
        """The Collector gives up (on the execution thread): the loop ends the job."""
        self.from_thread(self.end, job_id, state, error)

    def master_queue_changed(self) -> None:
        """Someone deleted prompts from the master's queue or cleared it (POST /queue): read it
        again now rather than at its next reading, so a deleted job's workers stop at once."""
        entry = self.queues.get(self.own_url())
        if entry is not None:
            entry.tried_at = float("-inf")
        for job in self.store.active():
            self.result_arrived(job.id)

    # --- running a job -----------------------------------------------------------------------
    async def start(self, job_id: str, prompt_id: str) -> None:
        self.loop = asyncio.get_running_loop()
        if self.upscales.start(job_id, prompt_id):
            return
        job_plan = self.plans.get(job_id)
        job = self.store.update(job_id, lambda j: _set_running(j, prompt_id))
        if job is None or job_plan is None:
            return
        if plan.MASTER_ID in job.shares:  # its own prompt waits in its queue
            self.store.update(job_id, lambda j: setattr(j.shares[plan.MASTER_ID], "state", "queued"))
        job_plan.started = self.clock.now()
        settings = job_plan.config.settings
        workers = [p for p in job.shares if p != plan.MASTER_ID]
        for k, worker_id in enumerate(workers):
            delay = k * settings.stagger_delay if settings.mode == "staggered" else 0.0
            self.spawn(self.run_share(job_id, job.shares[worker_id], delay, job_plan.config.worker(worker_id)))
        if prompt_id:
            self.spawn(self.watch_master(job_id, prompt_id))

    def active(self, job_id: str) -> bool:
        job = self.store.get(job_id)
        return job is not None and job.state in (JobState.PLANNED, JobState.RUNNING)

    def result_arrived(self, job_id: str) -> None:
        """Wake whoever watches this job now rather than at its next poll. Each wake-up uses a
        fresh event, so nobody can clear one that another watcher has not seen yet."""
        event = self.wakeups.pop(job_id, None)
        if event is not None:
            event.set()

    async def _nap(self, job_id: str, seconds: float) -> None:
        """Sleep until a result for this job arrives or ``seconds`` pass. Callers check their
        condition just before, with no await in between, so no wake-up is lost."""
        await self.clock.wait(self.wakeups.setdefault(job_id, asyncio.Event()), seconds)

    async def run_share(self, job_id: str, share: Share, delay: float, worker: Worker) -> bool:
        """Send one share to its worker and watch it; True once all its units have arrived."""
        if delay:
            await self.clock.sleep(delay)
        job_plan, job = self.plans.get(job_id), self.store.get(job_id)
        if not self.active(job_id) or job_plan is None or job is None:
            return False
        share.url = worker.url
        fields = {"job": job_id, "token": share.token, "timeout": job_plan.config.settings.job_timeout,
                  "master_url": self.master_url_for(job_plan.config, worker),
                  "transport": job_plan.config.settings.transport_for(worker)}
        chunks = plan.chunks_of(share.units) if job.split else [[u, 1] for u in share.units]
        seeds = [0] * len(chunks) if job.split else share.units
        prompt = workflow.worker_prompt(job_plan.prompt, job_plan.collectors, fields, chunks, seeds)
        client = self.client(worker.url)
        share.dispatched = self.clock.now()
        if not worker.is_local and not job_plan.config.master.host and self.loopback_only():
            await self.failover(job_id, share, f"it is on another machine ({worker.host}) but this master "
                                               "listens on 127.0.0.1 only; start the master with --listen "
                                               "(the launcher does when a worker is remote), or set master.host")
            return False
        try:
            # a worker that lacks a model or node class the prompt needs is left out, as one that is down
            files = workflow.input_files(prompt)
            lacks = doctor.blocking(prompt, await self.object_infos.get(worker.url, client.object_info), files)
            if lacks:  # a list from before a model was copied there must not keep the worker out
                self.object_infos.forget(worker.url)
                lacks = doctor.blocking(prompt, await self.object_infos.get(worker.url, client.object_info), files)
            if not lacks:
                await self.sync_inputs(client, prompt)
                prompt_id = await client.post_prompt(prompt, CLIENT_ID)
        except InstanceError as exc:
            self.reach.failed(worker.url, str(exc), exc.refused)
            await self.failover(job_id, share, str(exc))
            return False
        if lacks:
            await self.failover(job_id, share, doctor.lack_reason(lacks))
            return False
        self.reach.ok(worker.url)
        share.prompt_id = prompt_id
        share.dispatched = self.clock.now()
        if not self.active(job_id):  # the job ended while we were dispatching
            await self.withdraw(share)
            return False
        self.store.update(job_id, lambda j: setattr(share, "state", "queued"))
        done = await self.supervise(job_id, share, client, job_plan.config.settings.job_timeout)
        if done and job.split:
            self.spawn(self.learn(job_plan.signature, share, client, self.clock.now() - share.dispatched))
        return done

    async def learn(self, sig: str, share: Share, client: InstanceClient, fallback: float) -> None:
        """A worker's speed on this workflow, from when its prompt really ran (its history's
        execution timestamps), or from dispatch to delivery where ComfyUI does not tell."""
        seconds = fallback
        for _attempt in range(10):  # its prompt ends a moment after its results arrive
            try:
                entry = await client.history(share.prompt_id)
            except InstanceError:
                break
            if entry is not None:
                seconds = execution_seconds(entry) or fallback
                break
            await self.clock.sleep(0.3)
        self.throughput().observe(sig, share.participant, len(share.units), seconds)

    async def sync_inputs(self, client: InstanceClient, prompt: dict) -> None:
        """Upload the files the prompt's loaders read to a worker that lacks them (or holds a
        different file by that name), from the master's input folder."""
        if self.input_dir is None:
            return
        root = self.input_dir().resolve()
        for name in workflow.input_files(prompt):
            path = (root / name).resolve()
            if root not in path.parents or not path.is_file():
                continue  # not ours to send; the worker's own validation will name what is missing
            data, digest = await asyncio.get_running_loop().run_in_executor(None, _read_hashed, path)
            # the size first, which costs nothing; then the content, read back through /view
            if await client.input_size(name) == len(data) and await client.input_digest(name, len(data)) == digest:
                continue
            await client.upload_input(name, data)
            log.info("[Distributed] uploaded input %s to %s", name, client.url)

    # --- watching prompts ------------------------------------------------------------------------
    def _poll_interval(self, url: str, watched_item) -> float:
        """Seconds until a watched prompt's history is read again: the one nearest the head of
        the instance's queue (ComfyUI runs prompts in order) every POLL_SECONDS, later ones less
        often, so many queued jobs cost little."""
        watched = self.watching.get(url, [])
        position = next((i for i, w in enumerate(watched) if w is watched_item), len(watched))
        return min(POLL_SECONDS * (1 + position), MAX_POLL_SECONDS)

    async def queue_reading(self, client: InstanceClient, newer_than: float,
                        max_age: float = QUEUE_MAX_AGE) -> _Queue | None:
        """An instance's queue (the prompt ids it runs or holds) read after ``newer_than``, or
        None when no such reading is due yet (one was tried less than ``max_age`` seconds ago):
        one read of its queue serves every prompt watched there."""
        entry = self.queues.setdefault(client.url, _Queue())
        if entry.read_at >= newer_than:
            return entry
        if entry.reading is None:
            if self.clock.now() - entry.tried_at < max_age:
                return None
            entry.tried_at = self.clock.now()
            entry.reading = asyncio.ensure_future(self._read_queue(client, entry))
        await asyncio.shield(entry.reading)
        return entry if entry.read_at >= newer_than else None

    async def _read_queue(self, client: InstanceClient, entry: _Queue) -> None:
        sent = self.clock.now()
        try:
            running, pending = await client.queue()
        finally:
            entry.reading = None
        if sent > entry.read_at:
            entry.read_at, entry.ids, entry.running = sent, frozenset(running + pending), frozenset(running)

    async def watch(self, watched: Watch, timeout: float) -> tuple[str, str]:
        """Watch one worker prompt until whoever sent it stops waiting, or it comes to an end.
        Returns (outcome, why): ``delivered``; ``closed`` (nobody waits any more); ``finished``
        (ended without an error, with no grace); ``error`` (it failed there: why is ComfyUI's
        message); ``lost`` (its worker died, went silent for ``timeout`` seconds, or no longer has
        it); ``undelivered`` (it finished but its results never came). The one way every kind of
        worker prompt is watched: its job (where the worker has the jobs API) or its own history
        and the whole queue rarely, and the reachability checks."""
        url = watched.client.url
        self.watching.setdefault(url, []).append(watched)
        try:
            return await self._watch(watched, timeout)
        finally:
            remaining = self.watching.get(url, [])
            if watched in remaining:
                remaining.remove(watched)
            if not remaining:
                self.watching.pop(url, None)
            if not any(w.wake_key == watched.wake_key for ws in self.watching.values() for w in ws):
                self.wakeups.pop(watched.wake_key, None)

    async def _watch(self, watched: Watch, timeout: float) -> tuple[str, str]:
        client = watched.client
        finished_at = None
        running_seen = False
        answered = watched.dispatched  # the last answer to our own reads (the checks may forget a
        next_read = self.clock.now() + POLL_SECONDS  # worker removed from the config meanwhile)
        while True:
            # delivered first: the last share of a job ends the job as its units arrive
            if watched.delivered():
                return "delivered", ""
            if not watched.is_open():
                return "closed", ""
            now = self.clock.now()
            seen = self.reach.get(client.url)
            if seen is not None and seen.refusals >= REFUSALS_MEAN_GONE:
                return "lost", f"its ComfyUI is gone: {seen.error}"
            last_sign = max(answered, (seen.last_ok if seen is not None and seen.last_ok else 0.0))
            if now - last_sign > timeout:
                why = f": {seen.error}" if seen is not None and seen.error else ""
                return "lost", f"no sign of progress for {timeout:g} s{why}"
            if now < next_read:
                await self._nap(watched.wake_key, min(next_read - now, POLL_SECONDS))
                continue
            next_read = now + self._poll_interval(client.url, watched)
            try:
                where, entry = await client.prompt_state(watched.prompt_id)
                answered = self.clock.now()
                self.reach.ok(client.url)
                if where == "unknown":  # the jobs API knows every prompt it queued
                    return "lost", "the worker no longer has its prompt (was it restarted?)"
                if where == "running" and watched.on_running is not None and not running_seen:
                    running_seen = True
                    watched.on_running()
                if where == "unfinished":  # no jobs API: the queue tells pending and running apart
                    # whoever wants to know when it starts has the queue read every second until
                    # then (a spread prompt: one per worker); otherwise rarely, to find a lost one
                    wants_running = watched.on_running is not None and not running_seen
                    since = self.clock.now() - POLL_SECONDS if wants_running else watched.dispatched
                    queue = await self.queue_reading(client, max(since, watched.dispatched),
                                                 POLL_SECONDS if wants_running else QUEUE_MAX_AGE)
                    if queue is not None and wants_running and watched.prompt_id in queue.running:
                        running_seen = True
                        watched.on_running()
                    if queue is not None and watched.prompt_id not in queue.ids:
                        entry = await client.history(watched.prompt_id)
                        if entry is None:
                            return "lost", "the worker no longer has its prompt (was it restarted?)"
            except InstanceError as exc:
                self.reach.failed(client.url, str(exc), exc.refused)
                continue
            if entry is None or not watched.is_open() or watched.delivered():
                continue
            status = entry.get("status") or {}
            if status.get("status_str") == "error":
                return "error", history_error(status)
            if watched.grace is None:
                return "finished", ""
            finished_at = finished_at or self.clock.now()
            if self.clock.now() - finished_at > watched.grace:
                return "undelivered", ("its prompt finished but no result reached the master; "
                                       "check that the worker can reach the master's address")
            next_read = min(next_read, self.clock.now() + POLL_SECONDS)

    async def supervise(self, job_id: str, share: Share, client: InstanceClient, timeout: float) -> bool:
        """Watch one Collector share's prompt until its units arrive (True), or fail it over."""
        def delivered() -> bool:
            job = self.store.get(job_id)
            if job is None:  # ended: a finished job marked the shares that were not failed done
                return share.state == "done"
            return not job.missing_units(share.units)

        outcome, why = await self.watch(Watch(client, share.prompt_id, share.dispatched, job_id,
                                              lambda: self.active(job_id), delivered, FINISHED_GRACE), timeout)
        if outcome == "delivered":
            self.store.update(job_id, lambda j: setattr(share, "state", "done"))
            return True
        if outcome != "closed":
            await self.failover(job_id, share, why)
        return False

    async def prompt_end(self, client: InstanceClient, prompt_id: str, since: float, wake_key: str,
                         fast: Callable[[], bool] = lambda: True) -> dict | None:
        """Wait until a prompt of our own instance has ended: its history entry, or None when it
        left the queue without one (deleted). Read like a worker's prompt (``fast()`` False reads
        at the slow pace)."""
        marker = Watch(client, prompt_id, since, wake_key, lambda: True, lambda: False)
        self.watching.setdefault(client.url, []).append(marker)
        try:
            while True:
                if fast():
                    await self._nap(wake_key, self._poll_interval(client.url, marker))
                else:
                    await self.clock.sleep(POLL_SECONDS)
                try:
                    entry = await client.history(prompt_id)
                    if entry is None:
                        queue = await self.queue_reading(client, since)
                        if queue is None or prompt_id in queue.ids:
                            continue
                        entry = await client.history(prompt_id)
                except InstanceError:
                    continue
                return entry
        finally:
            watched = self.watching.get(client.url, [])
            if marker in watched:
                watched.remove(marker)

    async def failover(self, job_id: str, failed: Share, reason: str) -> None:
        """Give a failed share's missing units to other workers of the CURRENT config (a worker
        removed or disabled since the job was planned gets none); fail the job if nobody is left."""
        job = self.store.get(job_id)
        job_plan = self.plans.get(job_id)
        if job is None or job_plan is None or not self.active(job_id):
            return
        missing = job.missing_units(failed.units)
        log.warning("[Distributed] %s failed: %s", failed.label, reason)

        def mark(j: Job) -> None:
            failed.state, failed.error = "failed", reason
            j.notices.append(f"{failed.label} failed: {reason}")
        self.store.update(job_id, mark)
        if failed.prompt_id:
            self.spawn(self.withdraw(failed))
        if not missing:
            return
        failed_workers = {s.participant for s in job.shares.values() if s.state == "failed"}
        current = self.load_config().config
        candidates = [w for w in current.workers
                      if w.enabled and w.id not in failed_workers and not self.reach.is_down(w.url)]
        if not candidates:
            failures = [n for n in job.notices if " failed: " in n]  # this one last, each worker named
            failures += [f"{w.label} is unreachable: {self.reach.why(w.url)}" for w in current.workers
                         if w.enabled and w.id not in failed_workers and self.reach.is_down(w.url)]
            self.store.fail(job_id, f"{'; '.join(failures)}. No other worker is left to render the share "
                                    f"(units {plan.chunks_of(missing)} as [first, count]); "
                                    "the job stops rather than return a partial batch.")
            return
        if job.split:  # one share per worker that is left, in proportion to speed
            rates = self.throughput()
            parts = plan.split_units(missing, [(w.id, rates.rate(job_plan.signature, w.id)) for w in candidates])
            for worker_id, units in parts.items():
                worker = current.worker(worker_id)
                retry = Share(worker_id, worker.label, units, url=worker.url)
                self.store.update(job_id, lambda j, r=retry: j.shares.__setitem__(f"{r.participant}#{len(j.shares)}", r))
                log.warning("[Distributed] units %s go to %s instead", plan.chunks_of(units), retry.label)
                self.spawn(self.run_share(job_id, retry, 0.0, worker))
            return
        load = {w.id: sum(len(s.units) for s in job.shares.values()
                          if s.participant == w.id and s.state != "failed") for w in candidates}
        target = min(candidates, key=lambda w: load[w.id])
        retry = Share(target.id, target.label, missing, url=target.url)
        self.store.update(job_id, lambda j: j.shares.__setitem__(f"{target.id}#{len(j.shares)}", retry))
        log.warning("[Distributed] units %s go to %s instead", missing, target.label)
        self.spawn(self.run_share(job_id, retry, 0.0, target))

    async def watch_master(self, job_id: str, prompt_id: str) -> None:
        """Follow the master's own prompt to its end: a job still open then ended without its
        Collector finishing it (an error upstream, an interrupt, or the prompt deleted from the
        queue) and is cancelled. In split mode the prompt's history then tells when the master's
        share started, so its speed is learned. Read like a worker's: history first, the queue
        rarely, the prompt nearest the head of the queue most often."""
        me = self.client(self.own_url())
        job_plan, job = self.plans.get(job_id), self.store.get(job_id)  # kept after the job ends
        # once the job is over its prompt ends a moment later: no need to hurry
        entry = await self.prompt_end(me, prompt_id, self.clock.now(), job_id, lambda: self.active(job_id))
        if self.store.get(job_id) is not None:  # failed jobs too: they still hold results
            self.end(job_id, JobState.CANCELLED, "the master's prompt ended before its Collector finished"
                     if entry else "the prompt was removed from the master's queue")
            return
        if entry and job_plan and job_plan.master_done and job and job.split and plan.MASTER_ID in job.shares:
            started = execution_started(entry)
            seconds = job_plan.master_done - started if started else self.clock.now() - job_plan.started
            self.throughput().observe(job_plan.signature, plan.MASTER_ID,
                                      len(job.shares[plan.MASTER_ID].units), seconds)

    # --- the panel's operations -----------------------------------------------------------------
    def instances(self, config: Config) -> list[dict]:
        master = {"id": plan.MASTER_ID, "name": "master", "role": "master", "url": self.own_url(),
                  "enabled": config.master.enabled, "device": config.master.device}
        return [master] + [{"id": w.id, "name": w.label, "role": "worker", "url": w.url,
                            "enabled": w.enabled, "device": w.device, "host": w.host, "port": w.port,
                            "extra_args": w.extra_args} for w in config.workers]

    async def status(self, config: Config) -> list[dict]:
        """Every instance as the reachability checks last saw it. Reading it changes nothing;
        only an instance with no answer yet (the first moments after a start) is waited for, a
        few seconds at most."""
        infos = self.instances(config)
        self.begin()  # normally started with the server already
        await self.reach.settled([i["url"] for i in infos], timeout=3.0)
        rows = []
        for info in infos:
            seen = self.reach.get(info["url"])
            view = seen.view() if seen is not None else {"reach": "unknown", "error": "", "queue": None,
                                                         "device_name": None, "vram_total": None,
                                                         "vram_free": None}
            reach = view.pop("reach")
            if not info["enabled"]:
                state = "disabled"
            elif reach == "up":
                state = "busy" if view["queue"] else "online"
            elif reach == "down":
                state = "offline"
            else:
                state = "unknown"
            rows.append({**info, **view, "state": state,
                         "checked_ago": None if seen is None or seen.last_ok is None
                         else round(self.clock.now() - seen.last_ok, 1)})
        return rows

    async def broadcast(self, config: Config, action: str) -> list[dict]:
        """POST /free or /interrupt to the master and every enabled worker; answer per instance."""
        async def one(info: dict) -> dict:
            client = self.client(info["url"])
            try:
                await (client.free() if action == "free" else client.interrupt())
                return {"id": info["id"], "name": info["name"], "ok": True, "error": ""}
            except InstanceError as exc:
                return {"id": info["id"], "name": info["name"], "ok": False, "error": str(exc)}
        targets = [i for i in self.instances(config) if i["role"] == "master" or i["enabled"]]
        return list(await asyncio.gather(*(one(i) for i in targets)))

    async def close(self) -> None:
        await self.reach.stop()
        for task in list(self.tasks):
            task.cancel()
        if self._session is not None:
            await self._session.close()


class _Lost(Exception):
    pass


def refuse(json_data: dict, message: str) -> dict:
    """Keep a prompt out of ComfyUI's queue: without its prompt ComfyUI answers 400, and our
    middleware puts ``message`` in that answer."""
    log.warning("[Distributed] prompt refused: %s", message)
    json_data.pop("prompt", None)
    pending = refused.get()
    if pending is not None:
        pending.append(message)
    return json_data


def _read_hashed(path: Path) -> tuple[bytes, str]:
    data = path.read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def _set_running(job: Job, prompt_id: str) -> None:
    job.prompt_id = prompt_id
    job.state = JobState.RUNNING


def _malformed(prompt: Any) -> bool:
    """Not even the shape of a prompt (an object of nodes, each with a class_type and an object
    of inputs, linking only to nodes it holds): left to ComfyUI's own validation, which names
    what is wrong."""
    if not isinstance(prompt, dict):
        return True
    for node in prompt.values():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str) \
                or not isinstance(node.get("inputs", {}), dict):
            return True
        if any(workflow.is_link(v) and str(v[0]) not in prompt for v in (node.get("inputs") or {}).values()):
            return True  # a link to a node that is not there
    return False


def job_signature(job: Job, prompt: dict, fanned: list[str]) -> str:
    """What a split job's speeds are learned under ('' in multiply mode)."""
    return plan.signature(prompt, workflow.upstream(prompt, fanned)) if job.split else ""


def _copy(view, images) -> None:
    view[...] = images


def _timestamps(entry: dict) -> dict[str, float]:
    """Seconds since the epoch of the execution events that a history entry times (ComfyUI from
    mid-2024 stamps them in milliseconds; earlier versions give none)."""
    found = {}
    for message in (entry.get("status") or {}).get("messages") or []:
        if isinstance(message, (list, tuple)) and len(message) == 2 and isinstance(message[1], dict):
            stamp = message[1].get("timestamp")
            if isinstance(stamp, (int, float)) and not isinstance(stamp, bool):
                found[str(message[0])] = stamp / 1000.0
    return found


def execution_started(entry: dict) -> float | None:
    return _timestamps(entry).get("execution_start")


def execution_seconds(entry: dict) -> float | None:
    """How long a finished prompt really ran, queue time left out; None where ComfyUI does not tell."""
    stamps = _timestamps(entry)
    start, end = stamps.get("execution_start"), stamps.get("execution_success")
    return end - start if start is not None and end is not None and end > start else None


def _route_address(remote_host: str) -> str:
    """The local address the OS would use to reach a remote host (a UDP connect sends nothing)."""
    try:
        family = socket.AF_INET6 if ":" in remote_host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((remote_host, 9))
            return probe.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())
