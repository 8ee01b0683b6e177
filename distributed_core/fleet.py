"""The fleet: who the participants of this master are and how to use them. It knows nothing of any
kind of job; Collector jobs, tiled upscales and the spread queue each use it the same way.

It owns the participants (read from the config on every use, so that an edit counts at once), who
can be reached (one background check per instance, reach.Reachability), an HTTP client per
instance and what each instance's API offers, the watching of prompts (watch.Watcher) with the
relay that each worker prompt's work comes back over (relay.carry, answered by ``answer``), the one
way a prompt is sent to a worker (``send``: checks, input files, the POST), withdrawing it, the
background tasks on the server's loop, and the panel's status and broadcast.

One owner for all of it: the server's event loop. ComfyUI's execution thread acts on it only
through ``from_thread``.
"""
from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import os
import ssl
from pathlib import Path
from typing import Any, Callable

import aiohttp

from . import doctor, relay, workflow
from .client import InstanceClient, InstanceError
from .config import RAY_WORKER_ENV, Config, Loaded, Worker
from .plan import MASTER_ID
from .reach import Clock, Reachability
from .watch import Watch, Watcher, steps_of

log = logging.getLogger("comfyui-distributed")


class Unusable(Exception):
    """A worker cannot take a prompt now; the message says why and what to do."""


class Fleet:
    def __init__(self, load_config: Callable[[], Loaded], own_address: Callable[[], tuple[str, int]],
                 input_dir: Callable[[], Path] | None = None,
                 client_factory: Callable[[str], Any] | None = None, clock: Clock | None = None):
        self.load_config = load_config
        self.own_address = own_address
        self.input_dir = input_dir            # the master's input folder, for loaders' files
        self.clock = clock or Clock()
        self._client_factory = client_factory  # tests give a fake; else InstanceClient over HTTP
        self.api_features: dict = {}  # what each instance's HTTP API offers (see InstanceClient)
        self.reach = Reachability(self._watched_instances, self.client, self.clock)
        self.watcher = Watcher(self.reach, self.clock)
        self.object_infos = doctor.ObjectInfoCache()  # each worker's /object_info, for a short while
        self.tasks: set[asyncio.Task] = set()
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's, for calls from other threads
        self._session: aiohttp.ClientSession | None = None
        self._busy: list[Callable[[], set[str]]] = []
        self._tls_contexts: dict[str, ssl.SSLContext] = {}
        self._workers_by_url: dict[str, Worker] | None = None  # as of the last config read (every check)
        # answers what worker prompts send over their relays (inbox.Inbox, set by the runtime)
        self.answer: relay.Answer | None = None

    # --- who the participants are ---------------------------------------------------------------
    def config(self) -> Config:
        config = self.load_config().config
        self._workers_by_url = {w.url: w for w in config.workers}
        return config

    def is_worker_instance(self, config: Config) -> bool:
        """This instance is one of the config's local workers: it runs what it is sent, nothing more."""
        if os.environ.get(RAY_WORKER_ENV):  # a ComfyUI that a Ray actor started (ray_workers.py)
            return True
        _host, port = self.own_address()
        return port != config.master.port and any(w.is_local and w.port == port for w in config.workers)

    def usable(self, config: Config) -> list[Worker]:
        """The enabled workers that the reachability checks do not see down."""
        return [w for w in config.workers if w.enabled and not self.reach.is_down(w.url)]

    def left_out(self, config: Config) -> dict[str, str]:
        """Enabled workers seen down, by id: why."""
        return {w.id: self.reach.why(w.url) for w in config.workers if w.enabled and self.reach.is_down(w.url)}

    def own_url(self) -> str:
        host, port = self.own_address()
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def _watched_instances(self) -> list[tuple[str, bool]]:
        """What the reachability checks watch: this master and every worker of the current config
        (none on an instance that is itself a worker)."""
        config = self.config()
        if self.is_worker_instance(config):
            return []
        return [(self.own_url(), True)] + [(w.url, w.enabled) for w in config.workers]

    def add_busy(self, source: Callable[[], set[str]]) -> None:
        """A kind of job declares the workers it keeps busy with work that must not wait behind
        other work (Collector shares): ``busy()`` gathers them for whoever hands out work."""
        self._busy.append(source)

    def busy(self) -> set[str]:
        return set().union(*(source() for source in self._busy)) if self._busy else set()

    # --- talking to them ---------------------------------------------------------------------------
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    def client(self, url: str) -> InstanceClient:
        """The client of one instance: a worker of the config is reached with its CA file and
        headers (a worker given by url, behind an https proxy)."""
        if self._client_factory is not None:
            return self._client_factory(url)
        if self._workers_by_url is None:
            self.config()
        worker = self._workers_by_url.get(url.rstrip("/"))
        if worker is None or not (worker.ca_bundle or worker.headers):
            return InstanceClient(self.session(), url, self.api_features)
        try:
            tls, problem = self._tls(worker.ca_bundle), ""
        except ValueError as exc:
            tls, problem = None, str(exc)
        return InstanceClient(self.session(), url, self.api_features, tls=tls, headers=worker.headers,
                              problem=problem)

    def _tls(self, ca_bundle: str) -> "ssl.SSLContext | None":
        """A context that verifies certificates against ``ca_bundle`` (made once per file); None
        for the system's CAs. Raises ValueError, with why, for a file that is not a CA file."""
        if not ca_bundle:
            return None
        context = self._tls_contexts.get(ca_bundle)
        if context is None:
            context = ssl.create_default_context()
            try:
                context.load_verify_locations(cafile=ca_bundle)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"its ca_bundle {ca_bundle} cannot be read as a CA file ({exc}); "
                                 "give the path of a PEM file on the master") from None
            self._tls_contexts[ca_bundle] = context
        return context

    async def send(self, worker: Worker, prompt: dict, config: Config, client_id: str,
                   check_nodes: bool = False) -> tuple[InstanceClient, str]:
        """The one way a prompt goes to a worker: (its client, the prompt id it was queued under).
        With ``check_nodes``, a worker that lacks a node class or model the prompt needs; the files the
        prompt's loaders read are uploaded where the worker lacks them. Raises Unusable, with why."""
        client = self.client(worker.url)
        try:
            if check_nodes:
                lacks = await self._lacks(worker, client, prompt)
                if lacks:
                    raise Unusable(doctor.lack_reason(lacks))
            await self.sync_inputs(client, prompt)
            prompt_id = await client.post_prompt(prompt, client_id)
        except InstanceError as exc:
            self.reach.failed(worker.url, str(exc), exc.refused)
            raise Unusable(str(exc)) from None
        self.reach.ok(worker.url)
        return client, prompt_id

    async def _lacks(self, worker: Worker, client: InstanceClient, prompt: dict) -> list[dict]:
        files = workflow.input_files(prompt)
        lacks = doctor.blocking(prompt, await self.object_infos.get(worker.url, client.object_info), files)
        if lacks:  # a list from before a model was copied there must not keep the worker out
            self.object_infos.forget(worker.url)
            lacks = doctor.blocking(prompt, await self.object_infos.get(worker.url, client.object_info), files)
        return lacks

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

    async def watch(self, watched: Watch, timeout: float) -> tuple[str, str]:
        """Watch a worker's prompt (watch.Watcher) and, for one that has work to hand back, keep its
        relay open meanwhile, answering what the prompt sends with ``answer`` (relay.py). A relay
        that cannot be kept open ends the watch as ``lost``, with why. Its step progress goes to
        ``on_steps`` meanwhile, where it has one."""
        following = asyncio.ensure_future(self._follow_steps(watched)) \
            if watched.on_steps is not None and watched.client_id else None
        try:
            return await self._watch(watched, timeout)
        finally:
            if following is not None:
                following.cancel()
                await asyncio.gather(following, return_exceptions=True)

    async def _follow_steps(self, watched: Watch) -> None:
        """The worker's progress events for this prompt, from ComfyUI's own websocket; none when it
        cannot be opened (the job goes on without them)."""
        try:
            socket = await watched.client.events(watched.client_id)
        except InstanceError as exc:
            log.debug("[Distributed] no step progress from %s: %s", watched.client.url, exc)
            return
        try:
            while True:
                message = await socket.receive()
                if message.type == aiohttp.WSMsgType.TEXT:
                    steps = steps_of(message.data, watched.prompt_id)
                    if steps is not None:
                        watched.on_steps(*steps)
                elif message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                                      aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    break
        finally:
            await socket.close()

    async def _watch(self, watched: Watch, timeout: float) -> tuple[str, str]:
        if not watched.relay_token or self.answer is None:
            return await self.watcher.watch(watched, timeout)
        client, token = watched.client, watched.relay_token
        stop = asyncio.Event()
        carrying = asyncio.ensure_future(relay.carry(lambda: client.relay(token), self.answer, stop, client.url))
        watching = asyncio.ensure_future(self.watcher.watch(watched, timeout))
        try:
            await asyncio.wait({carrying, watching}, return_when=asyncio.FIRST_COMPLETED)
            if watching.done():
                return watching.result()
            watching.cancel()
            try:
                carrying.result()
                return "lost", "its relay ended"
            except relay.RelayFailed as exc:
                log.warning("[Distributed] %s", exc)
                return "lost", str(exc)
        finally:
            watching.cancel()
            stop.set()
            await asyncio.gather(carrying, return_exceptions=True)

    async def withdraw(self, url: str, prompt_id: str, label: str = "") -> None:
        """Take a prompt back from an instance (deleted while queued, interrupted while running);
        a failure is logged, not raised."""
        try:
            await self.client(url).withdraw(prompt_id)
        except InstanceError as exc:
            log.info("[Distributed] could not withdraw %s's prompt: %s", label or url, exc)

    def master_queue_changed(self) -> None:
        """Someone deleted prompts from the master's queue or cleared it (POST /queue): read it
        again now rather than at its next reading, so that a deleted job's workers stop at once."""
        self.watcher.queue_changed(self.own_url())

    # --- tasks on the server's loop ----------------------------------------------------------------
    def begin(self) -> None:
        """On the server's loop once it runs: start the reachability checks."""
        self.loop = asyncio.get_running_loop()
        self.reach.start()

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

    async def close(self) -> None:
        await self.reach.stop()
        for task in list(self.tasks):
            task.cancel()
        if self._session is not None:
            await self._session.close()

    # --- the panel's operations --------------------------------------------------------------------
    def instances(self, config: Config) -> list[dict]:
        master = {"id": MASTER_ID, "name": "master", "role": "master", "url": self.own_url(),
                  "enabled": config.master.enabled, "device": config.master.device}
        return [master] + [{"id": w.id, "name": w.label, "role": "worker", "url": w.url,
                            "enabled": w.enabled, "device": w.device, "host": w.host, "port": w.port,
                            "extra_args": w.extra_args, "address": w.address, "ca_bundle": w.ca_bundle,
                            "header_names": sorted(w.headers)} for w in config.workers]

    async def status(self, config: Config) -> list[dict]:
        """Every instance as the reachability checks last saw it. Reading it changes nothing;
        only an instance with no answer yet (the first moments after a start) is waited for, a
        few seconds at most."""
        infos = self.instances(config)
        self.begin()  # normally started with the server already
        await self.reach.settled([i["url"] for i in infos], timeout=3.0)
        return [self._status_row(info) for info in infos]

    def _status_row(self, info: dict) -> dict:
        seen = self.reach.get(info["url"])
        view = seen.view() if seen is not None else {"reach": "unknown", "error": "", "queue": None,
                                                     "device_name": None, "vram_total": None, "vram_free": None}
        reach = view.pop("reach")
        if not info["enabled"]:
            state = "disabled"
        elif reach == "up":
            state = "busy" if view["queue"] else "online"
        else:
            state = "offline" if reach == "down" else "unknown"
        return {**info, **view, "state": state,
                "checked_ago": None if seen is None or seen.last_ok is None
                else round(self.clock.now() - seen.last_ok, 1)}

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


def _read_hashed(path: Path) -> tuple[bytes, str]:
    data = path.read_bytes()
    return data, hashlib.sha256(data).hexdigest()
