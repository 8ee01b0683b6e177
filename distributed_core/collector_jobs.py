"""Collector jobs on the master: plan one when a prompt arrives, send each worker its share, watch
it, move the units of a worker that fails to one that works, learn the workers' speeds in split
mode, and end the job with its prompt. The workers come from the fleet (fleet.py); this module
knows nothing of the other kinds of job.

One owner for a job's state: the server's event loop. ``rewrite`` runs there too (ComfyUI calls
the prompt hook synchronously from its POST /prompt handler, so it only plans and rewrites). The
Collector on ComfyUI's execution thread only waits for results; whatever it needs done (its own
images put in place, the job ended) it asks of the loop through ``fleet.from_thread``. A job ends
in one way, ``end``.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

from . import audio
from . import config as config_file
from . import plan, provenance, values, workflow
from .client import InstanceError
from .config import Config, Worker
from .fleet import Fleet, Unusable
from .jobs import Job, JobFailed, JobState, JobStore, Share
from .watch import FINISHED_GRACE, Watch, execution_seconds, execution_started

log = logging.getLogger("comfyui-distributed")

STEPS_EVERY = 0.25  # seconds: how often a share's step progress is passed on to the panel


class PlanRefused(Exception):
    """A prompt holds a Collector but cannot be planned: POST /prompt answers 400 with this."""


@dataclass
class JobPlan:
    """What is kept beside a Collector job: the original prompt, the config it was planned
    with and, in split mode, what the participants' speeds are learned under."""
    prompt: dict
    collectors: list[str]
    config: Config
    signature: str = ""
    started: float = 0.0
    master_done: float = 0.0  # wall-clock time the master's own share was ready (split mode)




class CollectorJobs:
    def __init__(self, fleet: Fleet, store: JobStore):
        self.fleet = fleet
        self.store = store
        self.plans: dict[str, JobPlan] = {}
        self._throughput: plan.Throughput | None = None
        fleet.add_busy(self.busy_workers)

    # --- planning (synchronous, inside POST /prompt) --------------------------------------------
    def rewrite(self, json_data: dict, prompt: dict, targets: list | None, pending: list | None) -> dict:
        """The prompt hook's part for Collectors: the master's own prompt in json_data, and the job
        registered, when workers take part. Raises PlanRefused for a prompt that holds a Collector
        but cannot be planned."""
        collectors = workflow.fresh_collectors(prompt)
        if collectors and targets is not None:
            collectors = workflow.reached(prompt, collectors, targets)  # plan only what will run
        if not collectors:
            return json_data
        loaded = self.fleet.load_config()
        if loaded.error:
            log.warning("[Distributed] %s; running with defaults", loaded.error)
        config = loaded.config
        if self.fleet.is_worker_instance(config):
            return json_data
        try:
            job, own, fanned = plan_job(prompt, collectors, config, self.fleet.left_out(config), self.throughput())
        except (plan.PlanError, workflow.WorkflowError) as exc:
            raise PlanRefused(f"Multi-GPU Collector {', '.join(collectors)}: {exc}") from None
        if job is None:
            return json_data  # nobody else takes part: the Collector passes its images through
        chunks = plan.chunks_of(own) if job.split else [[u, 1] for u in own]
        seeds = [0] * len(chunks) if job.split else own
        rewritten = workflow.master_prompt(prompt, collectors, {"job": job.id}, chunks, seeds)
        rewritten = values.with_items(rewritten, value_owners(job, own, plan.MASTER_ID, config))
        for share in job.shares.values():
            share.values = values.labels(prompt, value_owners(job, share.units, share.participant, config))
        # Registered only once everything above has worked, so a failure leaves nothing behind.
        self.store.add(job)
        self.plans[job.id] = JobPlan(prompt, fanned, config, signature=job_signature(job, prompt, fanned))
        for notice in job.notices:
            log.warning("[Distributed] job %s: %s", job.id[:8], notice)
        json_data["prompt"] = rewritten
        if pending is not None:
            pending.append((self, job.id))
        else:  # called outside our middleware (should not happen): dispatch without waiting
            asyncio.get_running_loop().call_soon(lambda: self.fleet.spawn(self.start(job.id, "")))
        return json_data

    def throughput(self) -> plan.Throughput:
        if self._throughput is None:
            self._throughput = plan.Throughput(config_file.save_path().with_name("throughput.json"))
        return self._throughput

    def busy_workers(self) -> set[str]:
        """Workers with an unfinished share of a Collector job."""
        return {share.participant for job in self.store.active() for share in job.shares.values()
                if share.participant != plan.MASTER_ID and share.state not in ("done", "failed", "cancelled")}

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

    def provenance(self, job_id: str) -> provenance.Provenance | None:
        """Who each unit of the job belongs to and who rendered it, with the prompt as queued
        (provenance.py); None once the job is gone."""
        job, job_plan = self.store.get(job_id), self.plans.get(job_id)
        if job is None or job_plan is None:
            return None
        owners = [] if job.split else value_owners(job, job.units, plan.MASTER_ID, job_plan.config)
        units = provenance.origins(job, dict(zip(job.units, owners)))  # split: each unit's renderer
        return provenance.Provenance(provenance.queued(job_plan.prompt), units)

    # --- ending a job ------------------------------------------------------------------------------
    def end(self, job_id: str, state: JobState, error: str = "") -> Job | None:
        """The one way a job ends (on the loop): ended in the store, its plan and wake-ups dropped,
        its watchers woken so that they stop, and every worker prompt that may still run for it
        withdrawn. A share being dispatched at this moment withdraws its prompt itself once it
        has its id (see run_share)."""
        self.plans.pop(job_id, None)
        self.fleet.watcher.wake(job_id)
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
            self.fleet.spawn(self.withdraw(share))
        return job

    async def withdraw(self, share: Share) -> None:
        await self.fleet.withdraw(share.url, share.prompt_id, share.label)

    def drop(self, job_id: str, reason: str) -> None:
        """The master did not take the prompt that the job was planned for."""
        self.end(job_id, JobState.CANCELLED, reason)

    def finish(self, job_id: str, state: JobState, error: str = "") -> None:
        """The Collector gives up (on the execution thread): the loop ends the job."""
        self.fleet.from_thread(self.end, job_id, state, error)

    # --- running a job -----------------------------------------------------------------------
    async def start(self, job_id: str, prompt_id: str) -> None:
        """The master accepted the prompt of ``job_id`` (queued as ``prompt_id``): send the
        workers their shares, and follow the master's own prompt."""
        job_plan = self.plans.get(job_id)
        job = self.store.update(job_id, lambda j: _set_running(j, prompt_id))
        if job is None or job_plan is None:
            return
        if plan.MASTER_ID in job.shares:  # its own prompt waits in its queue
            self.store.update(job_id, lambda j: setattr(j.shares[plan.MASTER_ID], "state", "queued"))
        job_plan.started = self.fleet.clock.now()
        settings = job_plan.config.settings
        workers = [p for p in job.shares if p != plan.MASTER_ID]
        for k, worker_id in enumerate(workers):
            delay = k * settings.stagger_delay if settings.mode == "staggered" else 0.0
            self.fleet.spawn(self.run_share(job_id, job.shares[worker_id], delay, job_plan.config.worker(worker_id)))
        if prompt_id:
            self.fleet.spawn(self.watch_master(job_id, prompt_id))

    def active(self, job_id: str) -> bool:
        job = self.store.get(job_id)
        return job is not None and job.state in (JobState.PLANNED, JobState.RUNNING)

    async def run_share(self, job_id: str, share: Share, delay: float, worker: Worker) -> bool:
        """Send one share to its worker and watch it; True once all its units have arrived."""
        clock = self.fleet.clock
        if delay:
            await clock.sleep(delay)
        job_plan, job = self.plans.get(job_id), self.store.get(job_id)
        if not self.active(job_id) or job_plan is None or job is None:
            return False
        share.url = worker.url
        fields = {"job": job_id, "token": share.token, "timeout": job_plan.config.settings.job_timeout,
                  "transport": job_plan.config.settings.transport_for(worker)}
        chunks = plan.chunks_of(share.units) if job.split else [[u, 1] for u in share.units]
        seeds = [0] * len(chunks) if job.split else share.units
        prompt = workflow.worker_prompt(job_plan.prompt, job_plan.collectors, fields, chunks, seeds)
        owners = value_owners(job, share.units, share.participant, job_plan.config)
        prompt = values.with_items(prompt, owners)
        share.values = values.labels(job_plan.prompt, owners)
        share.dispatched = clock.now()
        try:
            # a worker that lacks a model or node class the prompt needs is left out, as one that is down
            client, share.prompt_id = await self.fleet.send(worker, prompt, job_plan.config, share.client_id,
                                                            check_nodes=True)
        except Unusable as exc:
            await self.failover(job_id, share, str(exc))
            return False
        share.dispatched = clock.now()
        if not self.active(job_id):  # the job ended while we were dispatching
            await self.withdraw(share)
            return False
        self.store.update(job_id, lambda j: setattr(share, "state", "queued"))
        done = await self.supervise(job_id, share, client, job_plan.config.settings.job_timeout)
        if done and job.split:
            self.fleet.spawn(self.learn(job_plan.signature, share, client, clock.now() - share.dispatched))
        return done

    async def learn(self, sig: str, share: Share, client, fallback: float) -> None:
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
            await self.fleet.clock.sleep(0.3)
        self.throughput().observe(sig, share.participant, len(share.units), seconds)

    async def supervise(self, job_id: str, share: Share, client, timeout: float) -> bool:
        """Watch one Collector share's prompt until its units arrive (True), or fail it over."""
        def delivered() -> bool:
            job = self.store.get(job_id)
            if job is None:  # ended: a finished job marked the shares that were not failed done
                return share.state == "done"
            return not job.missing_units(share.units)

        def running() -> None:  # its prompt started there: the panel shows it rendering, not queued
            self.store.update(job_id, lambda j: setattr(share, "state", "running") if share.state == "queued" else None)

        told = [0.0]

        def steps(step: int, most: int) -> None:  # at most a few messages a second to the browsers
            now = self.fleet.clock.now()
            if step >= most or now - told[0] >= STEPS_EVERY or not share.steps:
                told[0] = now
                self.store.update(job_id, lambda j: setattr(share, "steps", [step, most]))

        outcome, why = await self.fleet.watch(Watch(client, share.prompt_id, share.dispatched, job_id,
                                                    lambda: self.active(job_id), delivered, FINISHED_GRACE,
                                                    on_running=running, relay_token=share.token,
                                                    client_id=share.client_id, on_steps=steps), timeout)
        if outcome == "delivered":
            self.store.update(job_id, lambda j: setattr(share, "state", "done"))
            return True
        if outcome != "closed":
            await self.failover(job_id, share, why)
        return False

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
            self.fleet.spawn(self.withdraw(failed))
        if not missing:
            return
        failed_workers = {s.participant for s in job.shares.values() if s.state == "failed"}
        current = self.fleet.config()
        candidates = [w for w in self.fleet.usable(current) if w.id not in failed_workers]
        if not candidates:
            failures = [n for n in job.notices if " failed: " in n]  # this one last, each worker named
            down = self.fleet.left_out(current)
            failures += [f"{w.label} is unreachable: {down[w.id]}" for w in current.workers
                         if w.id in down and w.id not in failed_workers]
            self.store.fail(job_id, f"{'; '.join(failures)}. No other worker is left to render the share "
                                    f"(units {plan.chunks_of(missing)} as [first, count]); "
                                    "the job stops rather than return a partial batch.")
            return
        if job.split:  # one share per worker that is left, in proportion to speed
            rates = self.throughput()
            parts = plan.split_units(missing, [(w.id, rates.rate(job_plan.signature, w.id)) for w in candidates])
            for worker_id, units in parts.items():
                worker = current.worker(worker_id)
                retry = Share(worker_id, f"{worker.label} (for {failed.label})", units, url=worker.url)
                self.store.update(job_id, lambda j, r=retry: _rescue(j, r, failed))
                log.warning("[Distributed] units %s go to %s instead", plan.chunks_of(units), retry.label)
                self.fleet.spawn(self.run_share(job_id, retry, 0.0, worker))
            return
        load = {w.id: sum(len(s.units) for s in job.shares.values()
                          if s.participant == w.id and s.state != "failed") for w in candidates}
        target = min(candidates, key=lambda w: load[w.id])
        retry = Share(target.id, f"{target.label} (for {failed.label})", missing, url=target.url)
        self.store.update(job_id, lambda j: _rescue(j, retry, failed))
        log.warning("[Distributed] units %s go to %s instead", missing, target.label)
        self.fleet.spawn(self.run_share(job_id, retry, 0.0, target))

    async def watch_master(self, job_id: str, prompt_id: str) -> None:
        """Follow the master's own prompt to its end: a job still open then ended without its
        Collector finishing it (an error upstream, an interrupt, or the prompt deleted from the
        queue) and is cancelled. In split mode the prompt's history then tells when the master's
        share started, so its speed is learned. Read like a worker's: history first, the queue
        rarely, the prompt nearest the head of the queue most often."""
        fleet = self.fleet
        me = fleet.client(fleet.own_url())
        job_plan, job = self.plans.get(job_id), self.store.get(job_id)  # kept after the job ends
        # once the job is over its prompt ends a moment later: no need to hurry
        def running() -> None:  # the master renders its own share now: the panel says so
            self.store.update(job_id, lambda j: setattr(j.shares[plan.MASTER_ID], "state", "running")
                              if plan.MASTER_ID in j.shares and j.shares[plan.MASTER_ID].state == "queued" else None)

        entry = await fleet.watcher.prompt_end(me, prompt_id, fleet.clock.now(), job_id, lambda: self.active(job_id),
                                               on_running=running)
        if self.store.get(job_id) is not None:  # failed jobs too: they still hold results
            self.end(job_id, JobState.CANCELLED, "the master's prompt ended before its Collector finished"
                     if entry else "the prompt was removed from the master's queue")
            return
        if entry and job_plan and job_plan.master_done and job and job.split and plan.MASTER_ID in job.shares:
            started = execution_started(entry)
            seconds = job_plan.master_done - started if started else fleet.clock.now() - job_plan.started
            self.throughput().observe(job_plan.signature, plan.MASTER_ID,
                                      len(job.shares[plan.MASTER_ID].units), seconds)

    # --- the panel's operations -----------------------------------------------------------------


def plan_job(prompt: dict, collectors: list[str], config: Config, left_out: dict[str, str],
             rates: plan.Throughput) -> tuple[Job | None, list[int], list[str]]:
    """The job for a prompt under ``config``: (job, the master's units, the Collectors the
    workers render for), or (None, ...) when the master alone takes part. Workers in ``left_out``
    (seen down, by id: why) are planned out: their units (seed slots) stay and go to the others.
    A worker with no answer yet is planned in; if it refuses its prompt, its units fail over like
    any failed share's. Raises PlanError or WorkflowError."""
    slots = plan.slots(config)
    fanned = workflow.layout(prompt, collectors).fanned  # the Collectors workers render for
    batch = workflow.split_batch(prompt, fanned)
    workflow.check_audio(prompt, collectors, fanned, split=batch is not None)
    if len(slots) == 1 and slots[0].participant == plan.MASTER_ID:
        return None, [], fanned
    workers = {w.id: w for w in config.workers}
    left_out = {s.participant: left_out[s.participant] for s in slots if s.participant in left_out}
    available = [s.participant for s in slots if s.participant not in left_out]
    labels = {w.id: w.label for w in config.workers} | {plan.MASTER_ID: "master"}
    if not available:
        raise plan.PlanError("the master is disabled and no enabled worker can be reached: "
                             + "; ".join(f"{labels[p]}: {why}" for p, why in left_out.items())
                             + ". Start the workers (Distributed panel) or enable the master.")
    if batch is None:  # multiply: every participant renders the whole workflow with its own seed slot
        assignment = plan.assign({s.participant: [s.unit] for s in slots}, available)
        job = Job(id=uuid.uuid4().hex, collectors=[], units=[s.unit for s in slots])
    else:  # split: one contiguous share each, in proportion to the speeds learned for this workflow
        sig = plan.signature(prompt, workflow.upstream(prompt, fanned))
        assignment = plan.split_units(list(range(batch)), [(p, rates.rate(sig, p)) for p in available])
        job = Job(id=uuid.uuid4().hex, collectors=[], units=list(range(batch)), split=True)
    for participant, units in assignment.items():
        job.shares[participant] = Share(participant, labels[participant], units)
    job.collectors = fanned
    job.audio = {c for c in fanned if workflow.takes_audio(prompt, c)}
    for share in job.shares.values():
        share.url = workers[share.participant].url if share.participant in workers else ""
    for participant, why in left_out.items():
        job.notices.append(f"{labels[participant]} ({workers[participant].url}) was left out, unreachable: "
                           f"{why}. The others render its images; the job goes on.")
    return job, assignment.get(plan.MASTER_ID, []), fanned


def value_owners(job: Job, units: list[int], renderer: str, config: Config) -> list[str]:
    """Whose Distributed Values each item of a share takes (values.py): in multiply mode the
    participant whose seed slot each unit is, whoever renders it; in split mode the renderer, for
    each chunk."""
    if job.split:
        return [renderer] * len(plan.chunks_of(units))
    by_unit = {slot.unit: slot.participant for slot in plan.slots(config)}
    return [by_unit.get(unit, renderer) for unit in units]


def job_signature(job: Job, prompt: dict, fanned: list[str]) -> str:
    """What a split job's speeds are learned under ('' in multiply mode)."""
    return plan.signature(prompt, workflow.upstream(prompt, fanned)) if job.split else ""


def _rescue(job: Job, retry: Share, failed: Share) -> None:
    job.shares[f"{retry.participant}#{len(job.shares)}"] = retry
    job.notices.append(f"{retry.label.split(' (for ')[0]} renders {failed.label}'s images instead; the job goes on.")


def _set_running(job: Job, prompt_id: str) -> None:
    job.prompt_id = prompt_id
    job.state = JobState.RUNNING


def _copy(view, images) -> None:
    view[...] = images
