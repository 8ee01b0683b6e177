"""The master's side of a job: plan it when a prompt arrives, dispatch the workers' prompts, watch
them, move the units of a worker that fails to one that works, and end the job with its prompt.

Everything here runs on the server's event loop except ``rewrite``, which ComfyUI calls synchronously
from its POST /prompt handler (it must not block: it only plans and rewrites).
"""
from __future__ import annotations

import asyncio
import contextvars
import hashlib
import logging
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import aiohttp

from . import config as config_file
from . import plan, upscale, workflow
from .client import InstanceClient, InstanceError
from .config import Config, Loaded, Worker
from .jobs import Job, JobState, JobStore, Share

log = logging.getLogger("comfyui-distributed")

POLL_SECONDS = 1.0
OFFLINE_MEMORY = 20.0   # seconds a dispatch failure keeps a worker out of new plans
REFUSALS_MEAN_GONE = 3  # polls in a row refused: the worker's process has died
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
    started: float = field(default_factory=time.monotonic)
    master_done: float = 0.0  # wall-clock time the master's own share was ready (split mode)


class Coordinator:
    def __init__(self, store: JobStore, load_config: Callable[[], Loaded],
                 own_address: Callable[[], tuple[str, int]], input_dir: Callable[[], Path] | None = None,
                 loopback_only: Callable[[], bool] = lambda: False, partial_execution: bool = False):
        self.store = store
        self.load_config = load_config
        self.own_address = own_address
        self.input_dir = input_dir            # the master's input folder, for loaders' files
        self.loopback_only = loopback_only    # the master listens on 127.0.0.1 alone
        self.partial_execution = partial_execution  # ComfyUI runs only partial_execution_targets
        self.plans: dict[str, JobPlan] = {}
        self.offline_until: dict[str, float] = {}
        self.tasks: set[asyncio.Task] = set()
        self.wakeups: dict[str, asyncio.Event] = {}
        self.vault = workflow.Vault()  # result tokens of worker-role prompts sent to this instance
        self._throughput: plan.Throughput | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's, for calls from other threads
        self._session: aiohttp.ClientSession | None = None
        # Prompts that hold no Collector go here (the spread queue, distributed_core/spread.py).
        self.plain_prompt_hook: Callable[[dict], dict] | None = None
        self.upscales = upscale.Upscales(self)  # Distributed Tiled Upscale jobs (see upscale.py)

    # --- helpers ---------------------------------------------------------------------------------
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    def client(self, url: str) -> InstanceClient:
        return InstanceClient(self.session(), url)

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

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("[Distributed] internal error", exc_info=task.exception())

    def is_offline(self, worker_id: str) -> bool:
        return self.offline_until.get(worker_id, 0) > time.monotonic()

    def is_worker_instance(self, config: Config) -> bool:
        """This instance is one of the config's local workers: it runs what it is sent, nothing more."""
        _host, port = self.own_address()
        return port != config.master.port and any(w.is_local and w.port == port for w in config.workers)

    # --- planning (synchronous, inside POST /prompt) --------------------------------------------
    def rewrite(self, json_data: Any) -> Any:
        """ComfyUI's prompt hook. A prompt too malformed to plan is passed on untouched, with
        nothing registered: ComfyUI's own validation then says what is wrong with it."""
        try:
            return self._rewrite(json_data)
        except Exception:  # noqa: BLE001 - never fail inside ComfyUI's request; log and step aside
            log.debug("[Distributed] prompt not planned", exc_info=True)
            return json_data

    def _rewrite(self, json_data: Any) -> Any:
        if not isinstance(json_data, dict):
            return json_data
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
        loaded = self.load_config()
        if loaded.error:
            log.warning("[Distributed] %s; running with defaults", loaded.error)
        config = loaded.config
        if self.is_worker_instance(config):
            return json_data
        try:
            slots = plan.slots(config)
            fanned = workflow.layout(prompt, collectors).fanned  # the Collectors workers render for
            batch = workflow.split_batch(prompt, fanned)
        except (plan.PlanError, workflow.WorkflowError) as exc:
            json_data["prompt"] = _with_error(prompt, collectors, str(exc))
            return json_data
        if len(slots) == 1 and slots[0].participant == plan.MASTER_ID:
            return json_data  # nobody else takes part: the Collector passes its images through
        available = [s.participant for s in slots
                     if s.participant == plan.MASTER_ID or not self.is_offline(s.participant)]
        labels = {w.id: w.label for w in config.workers} | {plan.MASTER_ID: "master"}
        job_plan = JobPlan(prompt, fanned, config)
        try:
            if batch is None:
                job, own = self._plan_multiply(slots, available, labels)
            else:
                job, own = self._plan_split(batch, available, labels, job_plan)
        except plan.PlanError as exc:
            json_data["prompt"] = _with_error(prompt, collectors, str(exc))
            return json_data
        job.collectors = fanned
        for s in slots:
            if s.participant not in available:
                job.notices.append(f"{labels[s.participant]} was unreachable moments ago; "
                                   "its share goes to the others")
        chunks = plan.chunks_of(own) if job.split else [[u, 1] for u in own]
        seeds = [0] * len(chunks) if job.split else own
        rewritten = workflow.master_prompt(prompt, collectors, {"job": job.id}, chunks, seeds)
        # Registered only once everything above has worked, so a failure leaves nothing behind.
        self.store.add(job)
        self.plans[job.id] = job_plan
        json_data["prompt"] = rewritten
        pending = submitted.get()
        if pending is not None:
            pending.append(job.id)
        else:  # called outside our middleware (should not happen): dispatch without waiting
            asyncio.get_running_loop().call_soon(lambda: self.spawn(self.start(job.id, "")))
        return json_data

    def _plan_multiply(self, slots, available, labels) -> tuple[Job, list[int]]:
        """Every participant renders the whole workflow with its own seed slot."""
        assignment = plan.assign({s.participant: [s.unit] for s in slots}, available)
        job = Job(id=uuid.uuid4().hex, collectors=[], units=[s.unit for s in slots])
        for participant, units in assignment.items():
            job.shares[participant] = Share(participant, labels[participant], units)
        return job, assignment.get(plan.MASTER_ID, [])

    def _plan_split(self, batch: int, available: list[str], labels: dict[str, str],
                    job_plan: JobPlan) -> tuple[Job, list[int]]:
        """One batch divided by index: one contiguous share per participant, in one prompt, in
        proportion to the speeds learned for this workflow (equal when none are known yet)."""
        if not available:
            raise plan.PlanError("no worker can be reached and the master is disabled")
        rates = self.throughput()
        sig = job_plan.signature = plan.signature(job_plan.prompt,
                                                  workflow.upstream(job_plan.prompt, job_plan.collectors))
        shares = plan.split_units(list(range(batch)), [(p, rates.rate(sig, p)) for p in available])
        job = Job(id=uuid.uuid4().hex, collectors=[], units=list(range(batch)), split=True)
        for participant, units in shares.items():
            job.shares[participant] = Share(participant, labels[participant], units)
        return job, shares.get(plan.MASTER_ID, [])

    def throughput(self) -> plan.Throughput:
        if self._throughput is None:
            self._throughput = plan.Throughput(config_file.save_path().with_name("throughput.json"))
        return self._throughput

    def local_done(self, job_id: str, images: int) -> None:
        """The master's Collector has its own share (called on ComfyUI's execution thread); its
        speed is learned once the prompt's history tells when it started (see watch_master)."""
        job_plan, job = self.plans.get(job_id), self.store.get(job_id)
        if job is not None and plan.MASTER_ID in job.shares:
            self.store.update(job_id, lambda j: setattr(j.shares[plan.MASTER_ID], "state", "done"))
        if job_plan is not None:
            job_plan.master_done = time.time()

    def drop(self, job_id: str, reason: str) -> None:
        self.upscales.drop(job_id, reason)
        self.plans.pop(job_id, None)
        self.wakeups.pop(job_id, None)
        self.store.end(job_id, JobState.CANCELLED, reason)

    # --- running a job -----------------------------------------------------------------------
    async def start(self, job_id: str, prompt_id: str) -> None:
        self.loop = asyncio.get_running_loop()
        if self.upscales.start(job_id, prompt_id):
            return
        job = self.store.update(job_id, lambda j: _set_running(j, prompt_id))
        if job is not None and plan.MASTER_ID in job.shares:  # its own prompt waits in its queue
            self.store.update(job_id, lambda j: setattr(j.shares[plan.MASTER_ID], "state", "queued"))
        if job is None:
            return
        job_plan = self.plans[job_id]
        job_plan.started = time.monotonic()
        settings = job_plan.config.settings
        workers = [p for p in job.shares if p != plan.MASTER_ID]
        for k, worker_id in enumerate(workers):
            delay = k * settings.stagger_delay if settings.mode == "staggered" else 0.0
            self.spawn(self.run_share(job_id, job.shares[worker_id], delay))
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
        event = self.wakeups.setdefault(job_id, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), max(0.0, seconds))
        except asyncio.TimeoutError:
            pass

    async def run_share(self, job_id: str, share: Share, delay: float) -> bool:
        """Send one share to its worker and watch it; True once all its units have arrived."""
        if delay:
            await asyncio.sleep(delay)
        if not self.active(job_id):
            return False
        job_plan = self.plans[job_id]
        worker = job_plan.config.worker(share.participant)
        job = self.store.get(job_id)
        fields = {"job": job_id, "token": share.token, "timeout": job_plan.config.settings.job_timeout,
                  "master_url": self.master_url_for(job_plan.config, worker),
                  "transport": job_plan.config.settings.transport_for(worker)}
        chunks = plan.chunks_of(share.units) if job.split else [[u, 1] for u in share.units]
        seeds = [0] * len(chunks) if job.split else share.units
        prompt = workflow.worker_prompt(job_plan.prompt, job_plan.collectors, fields, chunks, seeds)
        client = self.client(worker.url)
        share.dispatched = time.monotonic()
        if not worker.is_local and not job_plan.config.master.host and self.loopback_only():
            await self.failover(job_id, share, f"it is on another machine ({worker.host}) but this master "
                                               "listens on 127.0.0.1 only; start the master with --listen "
                                               "(the launcher does when a worker is remote), or set master.host")
            return False
        try:
            await self.sync_inputs(client, prompt)
            share.prompt_id = await client.post_prompt(prompt, CLIENT_ID)
        except InstanceError as exc:
            self.offline_until[worker.id] = time.monotonic() + OFFLINE_MEMORY
            await self.failover(job_id, share, str(exc))
            return False
        self.offline_until.pop(worker.id, None)
        self.store.update(job_id, lambda j: setattr(share, "state", "queued"))
        if not self.active(job_id):  # the job ended while we were dispatching
            await _quietly(client.withdraw(share.prompt_id))
            return False
        done = await self.supervise(job_id, share, client, job_plan.config.settings.job_timeout)
        if done and job.split:
            self.spawn(self.learn(job_plan.signature, share, client, time.monotonic() - share.dispatched))
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
            await asyncio.sleep(0.3)
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
            if await client.input_size(name) == len(data) and await client.input_digest(name) == digest:
                continue
            await client.upload_input(name, data)
            log.info("[Distributed] uploaded input %s to %s", name, client.url)

    async def supervise(self, job_id: str, share: Share, client: InstanceClient, timeout: float) -> bool:
        """Watch one worker prompt until its units arrive, it fails, or it shows no sign of life."""
        last_sign = time.monotonic()
        finished_at = None
        refusals = 0
        next_poll = time.monotonic() + POLL_SECONDS
        while self.active(job_id):
            job = self.store.get(job_id)
            if job is None or not job.missing_units(share.units):
                self.store.update(job_id, lambda j: setattr(share, "state", "done"))
                return True
            if time.monotonic() < next_poll:
                await self._nap(job_id, next_poll - time.monotonic())
                continue
            next_poll = time.monotonic() + POLL_SECONDS
            entry = None
            try:
                entry = await client.history(share.prompt_id)
                if entry is None:
                    running, pending = await client.queue()
                    state = "running" if share.prompt_id in running else "queued"
                    if share.prompt_id not in running + pending:
                        entry = await client.history(share.prompt_id)
                        if entry is None:
                            raise _Lost("the worker no longer has its prompt (was it restarted?)")
                    elif share.state != state:
                        self.store.update(job_id, lambda j: setattr(share, "state", state))
                last_sign = time.monotonic()
                refusals = 0
            except InstanceError as exc:
                refusals = refusals + 1 if exc.refused else 0
                if refusals >= REFUSALS_MEAN_GONE:
                    await self.failover(job_id, share, f"its ComfyUI is gone: {exc}")
                    return False
                if time.monotonic() - last_sign > timeout:
                    await self.failover(job_id, share, f"no sign of progress for {timeout:g} s: {exc}")
                    return False
                continue
            except _Lost as exc:
                await self.failover(job_id, share, str(exc))
                return False
            if entry is not None and job.missing_units(share.units):
                status = entry.get("status") or {}
                if status.get("status_str") == "error":
                    await self.failover(job_id, share, _history_error(status))
                    return False
                # Finished: results are posted before the prompt ends, so allow only a moment more.
                finished_at = finished_at or time.monotonic()
                if time.monotonic() - finished_at > 5:
                    await self.failover(job_id, share, "its prompt finished but no result reached the master; "
                                                       "check that the worker can reach the master's address")
                    return False
        return False

    async def failover(self, job_id: str, failed: Share, reason: str) -> None:
        """Give a failed share's missing units to other workers; fail the job if nobody is left."""
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
            self.spawn(_quietly(self.client(job_plan.config.worker(failed.participant).url)
                                .withdraw(failed.prompt_id)))
        if not missing:
            return
        failed_workers = {s.participant for s in job.shares.values() if s.state == "failed"}
        candidates = [w for w in job_plan.config.workers
                      if w.enabled and w.id not in failed_workers and not self.is_offline(w.id)]
        if not candidates:
            failures = [n for n in job.notices if " failed: " in n]  # this one last, each worker named
            self.store.fail(job_id, f"{'; '.join(failures)}. No other worker is left to render the share "
                                    f"(units {plan.chunks_of(missing)} as [first, count]); "
                                    "the job stops rather than return a partial batch.")
            return
        if job.split:  # one share per worker that is left, in proportion to speed
            rates = self.throughput()
            parts = plan.split_units(missing, [(w.id, rates.rate(job_plan.signature, w.id)) for w in candidates])
            for worker_id, units in parts.items():
                retry = Share(worker_id, job_plan.config.worker(worker_id).label, units)
                self.store.update(job_id, lambda j, r=retry: j.shares.__setitem__(f"{r.participant}#{len(j.shares)}", r))
                log.warning("[Distributed] units %s go to %s instead", plan.chunks_of(units), retry.label)
                self.spawn(self.run_share(job_id, retry, 0.0))
            return
        load = {w.id: sum(len(s.units) for s in job.shares.values()
                          if s.participant == w.id and s.state != "failed") for w in candidates}
        target = min(candidates, key=lambda w: load[w.id])
        retry = Share(target.id, target.label, missing)
        self.store.update(job_id, lambda j: j.shares.__setitem__(f"{target.id}#{len(j.shares)}", retry))
        log.warning("[Distributed] units %s go to %s instead", missing, target.label)
        await self.run_share(job_id, retry, 0.0)

    async def watch_master(self, job_id: str, prompt_id: str) -> None:
        """Follow the master's own prompt to its end: a job still open then ended without its
        Collector finishing it (an error upstream, an interrupt, or the prompt deleted from the
        queue) and is cancelled. In split mode the prompt's history then tells when the master's
        share started, so its speed is learned."""
        me = self.client(self.own_url())
        job_plan, job = self.plans.get(job_id), self.store.get(job_id)  # kept after the job ends
        while True:
            await asyncio.sleep(POLL_SECONDS)
            try:
                entry = await me.history(prompt_id)
                if entry is None:
                    running, pending = await me.queue()
                    if prompt_id in running + pending:
                        continue
                    entry = await me.history(prompt_id)
            except InstanceError:
                continue
            break
        if self.store.get(job_id) is not None:  # failed jobs too: they still hold results
            await self.cancel(job_id, "the master's prompt ended before its Collector finished" if entry
                              else "the prompt was removed from the master's queue")
            return
        if entry and job_plan and job_plan.master_done and job and job.split and plan.MASTER_ID in job.shares:
            started = execution_started(entry)
            seconds = job_plan.master_done - started if started else time.monotonic() - job_plan.started
            self.throughput().observe(job_plan.signature, plan.MASTER_ID,
                                      len(job.shares[plan.MASTER_ID].units), seconds)

    async def cancel(self, job_id: str, reason: str) -> None:
        job_plan = self.plans.pop(job_id, None)
        self.wakeups.pop(job_id, None)
        job = self.store.end(job_id, JobState.CANCELLED, reason)
        if job is None or job_plan is None:
            return
        log.info("[Distributed] job %s cancelled: %s", job_id[:8], reason)
        await asyncio.gather(*(_quietly(self.client(job_plan.config.worker(s.participant).url)
                                        .withdraw(s.prompt_id))
                               for s in job.shares.values()
                               if s.prompt_id and s.state not in ("done", "failed")))

    def finish(self, job_id: str, state: JobState, error: str = "") -> None:
        """Called by the master's Collector (on ComfyUI's execution thread) when it has what it
        needs, or gives up: then whatever the workers still run for the job is withdrawn."""
        job_plan = self.plans.pop(job_id, None)
        self.wakeups.pop(job_id, None)
        job = self.store.get(job_id)
        outstanding = [] if job is None or job_plan is None or state is JobState.DONE else [
            (job_plan.config.worker(s.participant).url, s.prompt_id) for s in job.shares.values()
            if s.prompt_id and s.state not in ("done", "failed")]
        self.store.end(job_id, state, error)
        for url, prompt_id in outstanding:
            self.loop.call_soon_threadsafe(
                lambda u=url, p=prompt_id: self.spawn(_quietly(self.client(u).withdraw(p))))

    # --- the panel's operations -----------------------------------------------------------------
    def instances(self, config: Config) -> list[dict]:
        master = {"id": plan.MASTER_ID, "name": "master", "role": "master", "url": self.own_url(),
                  "enabled": config.master.enabled, "device": config.master.device}
        return [master] + [{"id": w.id, "name": w.label, "role": "worker", "url": w.url,
                            "enabled": w.enabled, "device": w.device, "host": w.host, "port": w.port,
                            "extra_args": w.extra_args} for w in config.workers]

    async def status(self, config: Config) -> list[dict]:
        async def probe(info: dict) -> dict:
            client = self.client(info["url"])
            try:
                stats, remaining = await asyncio.gather(client.system_stats(), client.queue_remaining())
            except InstanceError as exc:
                state = "disabled" if not info["enabled"] else "offline"
                return {**info, "state": state, "error": str(exc), "queue": None,
                        "device_name": None, "vram_total": None, "vram_free": None}
            if info["role"] == "worker":
                self.offline_until.pop(info["id"], None)
            devices = stats.get("devices") or [{}]
            state = "disabled" if not info["enabled"] else ("busy" if remaining else "online")
            return {**info, "state": state, "error": "", "queue": remaining,
                    "device_name": devices[0].get("name"), "vram_total": devices[0].get("vram_total"),
                    "vram_free": devices[0].get("vram_free")}
        return list(await asyncio.gather(*(probe(i) for i in self.instances(config))))

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


def _with_error(prompt: dict, collectors: list[str], message: str) -> dict:
    result = dict(prompt)
    for nid in collectors:
        result[nid] = workflow._with_field(prompt[nid], {"role": "error", "error": message})
    return result


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


def _history_error(status: dict) -> str:
    for event, data in status.get("messages") or []:
        if event == "execution_error" and isinstance(data, dict):
            return (f"ComfyUI reported an error in node {data.get('node_id')} "
                    f"({data.get('node_type')}): {data.get('exception_message', '').strip()}")
        if event == "execution_interrupted":
            return "its prompt was interrupted on the worker"
    return "its prompt ended with an error"


async def _quietly(coro) -> None:
    try:
        await coro
    except InstanceError:
        pass


def _route_address(remote_host: str) -> str:
    """The local address the OS would use to reach a remote host (a UDP connect sends nothing)."""
    try:
        family = socket.AF_INET6 if ":" in remote_host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((remote_host, 9))
            return probe.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())
