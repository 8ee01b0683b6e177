"""A fake ComfyUI behind a real InstanceClient (its HTTP calls answered in process), a fake clock,
and a master's runtime built over them (``Harness``): for the unit tests of the fleet and of
Collector jobs. The same behaviours run against real servers in the end-to-end tests."""
from __future__ import annotations

import asyncio
import itertools

import aiohttp
from pathlib import Path

from distributed_core import config as config_file
from distributed_core.client import InstanceClient, InstanceError
from distributed_core.reach import Clock
from harness import image_workflow
from runtimes import make_runtime, submit


MASTER = "http://127.0.0.1:18188"
W1, W2, W3 = "http://127.0.0.1:18189", "http://127.0.0.1:18190", "http://127.0.0.1:18191"


class FakeClock(Clock):
    """Time moves only when a test advances it; sleepers wake once it passes their deadline."""

    def __init__(self):
        self.t = 1000.0
        self.sleepers: list[tuple[float, asyncio.Future]] = []

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds
        due = [(d, f) for d, f in self.sleepers if d <= self.t]
        self.sleepers = [(d, f) for d, f in self.sleepers if d > self.t]
        for _d, future in due:
            if not future.done():
                future.set_result(None)

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        self.sleepers.append((self.t + max(0.0, seconds), future))
        await future

    async def wait(self, event: asyncio.Event, seconds: float) -> None:
        waiter = asyncio.ensure_future(event.wait())
        sleeper = asyncio.ensure_future(self.sleep(seconds))
        await asyncio.wait([waiter, sleeper], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        sleeper.cancel()


class Instance:
    """One fake ComfyUI: its queue, its history, and everything asked of it."""

    ids = itertools.count(1)

    def __init__(self, url: str):
        self.url = url
        self.up = True
        self.refuses = True  # when down: the connection is refused (else it times out)
        self.running: list[str] = []
        self.pending: list[str] = []
        self.history: dict[str, dict] = {}
        self.prompts: dict[str, dict] = {}
        self.calls: list[tuple[str, str, object]] = []
        self.hold_posts: asyncio.Event | None = None  # set: POST /prompt waits for it
        self.jobs_api = False  # ComfyUI 0.38's GET /api/jobs/{id} and POST /api/jobs/{id}/cancel
        self.events: list[str] = []  # messages its websocket (/ws) sends, in order, as they are added

    def finish(self, prompt_id: str, status: str = "success") -> None:
        for queue in (self.running, self.pending):
            if prompt_id in queue:
                queue.remove(prompt_id)
        self.history[prompt_id] = {"status": {"status_str": status, "messages": []}, "outputs": {}}


class EveryNode(dict):
    """An /object_info answer that has every node class, each with no inputs to check."""

    def __contains__(self, key) -> bool:
        return True

    def __getitem__(self, key):
        return {"input": {}}


class IdleSocket:
    """An open websocket on which nothing arrives until it is closed."""

    def __init__(self):
        self.closed = False
        self._closing = asyncio.Event()

    async def receive(self):
        await self._closing.wait()
        return aiohttp.WSMessage(aiohttp.WSMsgType.CLOSED, None, None)

    async def send_str(self, _data: str) -> None:
        pass

    async def close(self) -> None:
        self.closed = True
        self._closing.set()


class EventSocket(IdleSocket):
    """ComfyUI's websocket of a fake worker: what the test adds to ``events`` arrives, in order."""

    def __init__(self, events: list[str]):
        super().__init__()
        self.events, self.sent = events, 0

    async def receive(self):
        while self.sent >= len(self.events) and not self.closed:
            await asyncio.sleep(0)
        if self.closed:
            return aiohttp.WSMessage(aiohttp.WSMsgType.CLOSED, None, None)
        self.sent += 1
        return aiohttp.WSMessage(aiohttp.WSMsgType.TEXT, self.events[self.sent - 1], None)


class FakeClient(InstanceClient):
    def __init__(self, world: dict[str, Instance], url: str, features: dict | None = None):
        super().__init__(None, url, features)
        self.world = world

    @staticmethod
    def _job(inst: Instance, path: str, method: str):
        """ComfyUI 0.38's jobs API, as read from its server (comfy_execution/jobs.py)."""
        if not inst.jobs_api:
            raise InstanceError(f"{inst.url}{path} answered 404: Not Found", status=404)
        if path.startswith("/api/jobs?"):
            return {"jobs": [], "pagination": {}}
        prompt_id = path.split("/")[3]
        if method == "POST":  # cancel: dequeued if pending, interrupted if running, else nothing
            if prompt_id in inst.pending:
                inst.pending.remove(prompt_id)
            return {"cancelled": prompt_id in inst.running}
        if prompt_id in inst.running or prompt_id in inst.pending:
            return {"id": prompt_id, "status": "in_progress" if prompt_id in inst.running else "pending"}
        if prompt_id not in inst.history:
            raise InstanceError(f"{inst.url}{path} answered 404: job not found", status=404)
        status = inst.history[prompt_id]["status"]
        if status["status_str"] == "success":
            return {"id": prompt_id, "status": "completed", "execution_status": status}
        return {"id": prompt_id, "status": "failed", "execution_error": {
            "node_id": "3", "node_type": "DistributedTestProbe", "exception_message": "out of ink"}}

    async def relay(self, token: str):
        """A prompt's relay (relay.py) that its worker never uses: these fake workers hand nothing
        back over it; tests put results into the job store themselves."""
        inst = self.world.get(self.url)
        if inst is None or not inst.up:
            raise InstanceError(f"cannot connect to {self.url}; is that ComfyUI instance running?", refused=True)
        inst.calls.append(("WS", "/distributed/relay", token))
        return IdleSocket()

    async def events(self, client_id: str):
        """ComfyUI's websocket of these fake workers: the instance's ``events``, as they come."""
        inst = self.world.get(self.url)
        if inst is None or not inst.up:
            raise InstanceError(f"cannot connect to {self.url}; is that ComfyUI instance running?", refused=True)
        inst.calls.append(("WS", "/ws", client_id))
        return EventSocket(inst.events)

    async def _request(self, method, path, timeout, body=None):
        inst = self.world.get(self.url)
        if inst is None or not inst.up:
            if inst is not None and not inst.refuses:
                raise InstanceError(f"{self.url} did not answer in time")
            raise InstanceError(f"cannot connect to {self.url}; is that ComfyUI instance running?", refused=True)
        inst.calls.append((method, path, body))
        if path.startswith("/api/jobs"):
            return self._job(inst, path, method)
        if (method, path) == ("POST", "/prompt"):
            if inst.hold_posts is not None:
                await inst.hold_posts.wait()
            prompt_id = f"p{next(Instance.ids)}"
            inst.prompts[prompt_id] = body["prompt"]
            inst.pending.append(prompt_id)
            return {"prompt_id": prompt_id}
        if method == "GET" and path.startswith("/history/"):
            prompt_id = path.rsplit("/", 1)[1]
            return {prompt_id: inst.history[prompt_id]} if prompt_id in inst.history else {}
        if (method, path) == ("GET", "/queue"):
            return {"queue_running": [[0, p, {}] for p in inst.running],
                    "queue_pending": [[1, p, {}] for p in inst.pending]}
        if (method, path) == ("POST", "/queue"):
            for prompt_id in body.get("delete", []):
                if prompt_id in inst.pending:
                    inst.pending.remove(prompt_id)
            return None
        if (method, path) == ("POST", "/interrupt"):
            return None
        if (method, path) == ("GET", "/system_stats"):
            return {"devices": [{"name": "fake"}]}
        if (method, path) == ("GET", "/prompt"):
            return {"exec_info": {"queue_remaining": len(inst.running) + len(inst.pending)}}
        if (method, path) == ("GET", "/object_info"):
            return EveryNode()
        raise AssertionError(f"unexpected {method} {path}")


def config_with(*workers: tuple[str, int, bool], master_enabled: bool = True) -> config_file.Config:
    return config_file.parse({"master": {"port": 18188, "enabled": master_enabled},
                              "settings": {"job_timeout": 30, "mode": "parallel"},
                              "workers": [{"id": wid, "port": port, "enabled": enabled}
                                          for wid, port, enabled in workers]})


class Harness:
    def __init__(self, tmp_path: Path, config: config_file.Config):
        self.config = config
        self.world = {url: Instance(url) for url in (MASTER, W1, W2, W3)}
        self.features: dict = {}  # what the clients learned of each fake's API
        global CLOCK
        self.clock = CLOCK = FakeClock()
        self.runtime = make_runtime(None, tmp_path, load=lambda: config_file.Loaded(self.config, tmp_path / "c.json"),
                                    client_factory=lambda url: FakeClient(self.world, url, self.features),
                                    clock=self.clock)
        self.fleet, self.jobs = self.runtime.fleet, self.runtime.collectors
        self.fleet.reach.start = lambda: None  # the tests run the checks themselves (checked())

    def submit(self, prompt: dict) -> tuple[dict, list[str], list[str]]:
        """POST /prompt as the middleware sees it: (the request after the hook, jobs planned, refusals)."""
        return submit(self.runtime, prompt)

    async def started(self, seed: int = 10) -> str:
        """A one-image multiply job submitted and started; its id."""
        _data, (job_id,), _refusals = self.submit(image_workflow(seed=seed, batch=1))
        await self.jobs.start(job_id, "")
        return job_id

    async def checked(self) -> None:
        """One round of reachability checks, answered."""
        await asyncio.gather(*self.fleet.reach.tick())

    def worker_prompts(self, url: str) -> list[dict]:
        return list(self.world[url].prompts.values())


CLOCK: FakeClock | None = None  # the running test's, advanced while waiting for a condition


async def until(predicate, steps: int = 20000) -> None:
    for step in range(steps):
        if predicate():
            return
        await asyncio.sleep(0)
        if CLOCK is not None and step % 20 == 19:
            CLOCK.advance(0.1)
    raise AssertionError("the condition never held")


def units_of(prompt: dict) -> list[int]:
    """The seed units a worker-role prompt renders (its Distributed Seed's field)."""
    import json
    field = json.loads(prompt["1"]["inputs"]["_distributed"])
    return field["units"]


def run(coro):
    return asyncio.run(coro)

