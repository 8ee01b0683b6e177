"""The master's side of a job: plan it when a prompt arrives, dispatch the workers' prompts, watch
them, move the units of a worker that fails to one that works, and end the job with its prompt.

Everything here runs on the server's event loop except ``rewrite``, which ComfyUI calls synchronously
from its POST /prompt handler (it must not block: it only plans and rewrites).
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import aiohttp

from . import plan, workflow
from .client import InstanceClient, InstanceError
from .config import Config, Loaded, Worker
from .jobs import Job, JobState, JobStore, Share

log = logging.getLogger("comfyui-distributed")

POLL_SECONDS = 1.0
OFFLINE_MEMORY = 20.0   # seconds a dispatch failure keeps a worker out of new plans
CLIENT_ID = "comfyui-distributed"

# Jobs planned during the POST /prompt request being handled; the middleware activates or drops them.
submitted: contextvars.ContextVar[list | None] = contextvars.ContextVar("distributed_submitted", default=None)


@dataclass
class JobPlan:
    prompt: dict
    collectors: list[str]
    config: Config


class Coordinator:
    def __init__(self, store: JobStore, load_config: Callable[[], Loaded],
                 own_address: Callable[[], tuple[str, int]]):
        self.store = store
        self.load_config = load_config
        self.own_address = own_address
        self.plans: dict[str, JobPlan] = {}
        self.offline_until: dict[str, float] = {}
        self.tasks: set[asyncio.Task] = set()
        self._session: aiohttp.ClientSession | None = None

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
        if not isinstance(json_data, dict):
            return json_data
        prompt = json_data.get("prompt")
        collectors = workflow.fresh_collectors(prompt)
        if not collectors:
            return json_data
        loaded = self.load_config()
        if loaded.error:
            log.warning("[Distributed] %s; running with defaults", loaded.error)
        config = loaded.config
        if self.is_worker_instance(config):
            return json_data
        try:
            slots = plan.slots(config)
            available = [s.participant for s in slots
                         if s.participant == plan.MASTER_ID or not self.is_offline(s.participant)]
            assignment = plan.assign({s.participant: [s.unit] for s in slots}, available)
        except plan.PlanError as exc:
            json_data["prompt"] = _with_error(prompt, collectors, str(exc))
            return json_data
        if list(assignment) == [plan.MASTER_ID] and len(slots) == 1:
            return json_data  # nobody else takes part: the Collector passes its images through

        job = Job(id=uuid.uuid4().hex, collectors=collectors, units=[s.unit for s in slots])
        labels = {w.id: w.label for w in config.workers} | {plan.MASTER_ID: "master"}
        for participant, units in assignment.items():
            job.shares[participant] = Share(participant, labels[participant], units)
        for s in slots:
            if s.participant not in assignment:
                job.notices.append(f"{labels[s.participant]} was unreachable moments ago; "
                                   f"its share goes to another participant")
        self.store.add(job)
        self.plans[job.id] = JobPlan(prompt, collectors, config)
        json_data["prompt"] = workflow.master_prompt(prompt, collectors, {"job": job.id},
                                                     assignment.get(plan.MASTER_ID, []))
        pending = submitted.get()
        if pending is not None:
            pending.append(job.id)
        else:  # called outside our middleware (should not happen): dispatch without waiting
            asyncio.get_running_loop().call_soon(lambda: self.spawn(self.start(job.id, "")))
        return json_data

    def drop(self, job_id: str, reason: str) -> None:
        self.plans.pop(job_id, None)
        self.store.end(job_id, JobState.CANCELLED, reason)

    # --- running a job -----------------------------------------------------------------------
    async def start(self, job_id: str, prompt_id: str) -> None:
        job = self.store.update(job_id, lambda j: _set_running(j, prompt_id))
        if job is None:
            return
        config = self.plans[job_id].config
        worker_shares = [s for s in job.shares.values() if s.participant != plan.MASTER_ID]
        for k, share in enumerate(worker_shares):
            delay = k * config.settings.stagger_delay if config.settings.mode == "staggered" else 0.0
            self.spawn(self.run_share(job_id, share, delay))
        if prompt_id:
            self.spawn(self.watch_master(job_id, prompt_id))

    def active(self, job_id: str) -> bool:
        job = self.store.get(job_id)
        return job is not None and job.state in (JobState.PLANNED, JobState.RUNNING)

    async def run_share(self, job_id: str, share: Share, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        if not self.active(job_id):
            return
        job_plan = self.plans[job_id]
        worker = job_plan.config.worker(share.participant)
        job = self.store.get(job_id)
        fields = {"job": job_id, "token": job.token, "timeout": job_plan.config.settings.job_timeout,
                  "master_url": self.master_url_for(job_plan.config, worker)}
        prompt = workflow.worker_prompt(job_plan.prompt, job_plan.collectors, fields, share.units)
        client = self.client(worker.url)
        try:
            share.prompt_id = await client.post_prompt(prompt, CLIENT_ID)
        except InstanceError as exc:
            self.offline_until[worker.id] = time.monotonic() + OFFLINE_MEMORY
            await self.failover(job_id, share, str(exc))
            return
        self.offline_until.pop(worker.id, None)
        self.store.update(job_id, lambda j: setattr(share, "state", "queued"))
        if not self.active(job_id):  # the job ended while we were dispatching
            await _quietly(client.withdraw(share.prompt_id))
            return
        await self.supervise(job_id, share, client, job_plan.config.settings.job_timeout)

    async def supervise(self, job_id: str, share: Share, client: InstanceClient, timeout: float) -> None:
        """Watch one worker prompt until its units arrive, it fails, or it shows no sign of life."""
        last_sign = time.monotonic()
        finished_at = None
        while self.active(job_id):
            job = self.store.get(job_id)
            if job is None or not job.missing_units(share.units):
                self.store.update(job_id, lambda j: setattr(share, "state", "done"))
                return
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
            except InstanceError as exc:
                if time.monotonic() - last_sign > timeout:
                    await self.failover(job_id, share, f"no sign of progress for {timeout:g} s: {exc}")
                    return
            except _Lost as exc:
                await self.failover(job_id, share, str(exc))
                return
            if entry is not None:
                status = entry.get("status") or {}
                if status.get("status_str") == "error":
                    await self.failover(job_id, share, _history_error(status))
                    return
                # Finished: results are posted before the prompt ends, so allow only a moment more.
                finished_at = finished_at or time.monotonic()
                if time.monotonic() - finished_at > 5:
                    await self.failover(job_id, share, "its prompt finished but no result reached the master; "
                                                       "check that the worker can reach the master's address")
                    return
            await asyncio.sleep(POLL_SECONDS)

    async def failover(self, job_id: str, failed: Share, reason: str) -> None:
        """Give a failed share's missing units to another worker; fail the job if nobody is left."""
        job = self.store.get(job_id)
        if job is None or not self.active(job_id):
            return
        missing = job.missing_units(failed.units)
        log.warning("[Distributed] %s failed: %s", failed.label, reason)

        def mark(j: Job) -> None:
            failed.state, failed.error = "failed", reason
            j.notices.append(f"{failed.label} failed: {reason}")
        self.store.update(job_id, mark)
        if failed.prompt_id:
            self.spawn(_quietly(self.client(self.plans[job_id].config.worker(failed.participant).url)
                                .withdraw(failed.prompt_id)))
        if not missing:
            return
        failed_workers = {s.participant for s in job.shares.values() if s.state == "failed"}
        candidates = [w for w in self.plans[job_id].config.workers
                      if w.enabled and w.id not in failed_workers and not self.is_offline(w.id)]
        if not candidates:
            self.store.fail(job_id, f"{failed.label} failed: {reason}. No other worker is left to render "
                                    f"its share (units {missing}); the job stops rather than return a "
                                    "partial batch.")
            return
        load = {w.id: sum(len(s.units) for s in job.shares.values()
                          if s.participant == w.id and s.state != "failed") for w in candidates}
        target = min(candidates, key=lambda w: load[w.id])
        retry = Share(target.id, target.label, missing)
        self.store.update(job_id, lambda j: j.shares.__setitem__(f"{target.id}#{len(j.shares)}", retry))
        log.warning("[Distributed] units %s go to %s instead", missing, target.label)
        await self.run_share(job_id, retry, 0.0)

    async def watch_master(self, job_id: str, prompt_id: str) -> None:
        """End the job when the master's prompt ends without its Collector finishing it
        (an error upstream, an interrupt, or the prompt deleted from the queue)."""
        me = self.client(self.own_url())
        while self.store.get(job_id) is not None:  # failed jobs too: they still hold results
            await asyncio.sleep(POLL_SECONDS)
            try:
                if await me.history(prompt_id) is None:
                    running, pending = await me.queue()
                    if prompt_id in running + pending:
                        continue
                    if await me.history(prompt_id) is None:  # neither queued nor finished: deleted
                        await self.cancel(job_id, "the prompt was removed from the master's queue")
                        return
            except InstanceError:
                continue
            await self.cancel(job_id, "the master's prompt ended before its Collector finished")
            return

    async def cancel(self, job_id: str, reason: str) -> None:
        job_plan = self.plans.pop(job_id, None)
        job = self.store.end(job_id, JobState.CANCELLED, reason)
        if job is None or job_plan is None:
            return
        log.info("[Distributed] job %s cancelled: %s", job_id[:8], reason)
        await asyncio.gather(*(_quietly(self.client(job_plan.config.worker(s.participant).url)
                                        .withdraw(s.prompt_id))
                               for s in job.shares.values()
                               if s.prompt_id and s.state not in ("done", "failed")))

    def finish(self, job_id: str, state: JobState, error: str = "") -> None:
        """Called by the master's Collector when it has what it needs, or gives up."""
        self.plans.pop(job_id, None)
        self.store.end(job_id, state, error)

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


def _set_running(job: Job, prompt_id: str) -> None:
    job.prompt_id = prompt_id
    job.state = JobState.RUNNING


def _with_error(prompt: dict, collectors: list[str], message: str) -> dict:
    result = dict(prompt)
    for nid in collectors:
        result[nid] = workflow._with_field(prompt[nid], {"role": "error", "error": message})
    return result


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
