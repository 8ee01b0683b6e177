"""Who can be reached: one background check per instance, on the master's event loop.

Every ``INTERVAL`` seconds each instance in the config (the master itself included) is asked two
cheap questions, GET /system_stats and GET /prompt. An instance that does not answer is asked less
often (backing off to ``MAX_BACKOFF``), and one that is disabled only every ``DISABLED_INTERVAL``.
What the checks learn is the only knowledge of reachability there is: planning leaves out
instances known to be down, supervision fails a share over when its worker is gone, and
GET /distributed/status reports it. Reading it changes nothing. A connection refused (nothing
listens) costs nothing, so such an instance keeps being asked every ``INTERVAL``; only one that does
not answer at all is backed off.

Other requests to an instance (dispatch, history reads) report their outcome here too, so a
worker that refuses a prompt is known to be down at once, without waiting for the next check.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("comfyui-distributed")

INTERVAL = 2.0           # seconds between checks of an enabled instance that answers
DISABLED_INTERVAL = 10.0  # a disabled worker is only shown in the panel
MAX_BACKOFF = 10.0       # an instance that keeps timing out is checked at least this often
TICK = 0.5               # how often the monitor looks for checks that are due


class Clock:
    """Time as the fleet sees it; tests give a fake one."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    async def wait(self, event: asyncio.Event, seconds: float) -> None:
        """Until ``event`` is set or ``seconds`` pass."""
        try:
            await asyncio.wait_for(event.wait(), max(0.0, seconds))
        except asyncio.TimeoutError:
            pass


@dataclass
class Seen:
    """What the checks know of one instance (by URL)."""
    url: str
    state: str = "unknown"        # unknown (no answer yet) | up | down
    error: str = ""               # why it is down
    failures: int = 0             # failed checks in a row
    refusals: int = 0             # of those, connections refused in a row: nothing listens there
    last_ok: float | None = None  # clock time of the last answer
    since: float = 0.0            # clock time the state last changed
    next_check: float = 0.0
    checking: bool = False
    stats: dict = field(default_factory=dict)  # the last /system_stats answer
    queue: int | None = None      # queue_remaining at the last answer

    def view(self) -> dict:
        devices = self.stats.get("devices") or [{}]
        return {"reach": self.state, "error": self.error, "queue": self.queue,
                "device_name": devices[0].get("name"), "vram_total": devices[0].get("vram_total"),
                "vram_free": devices[0].get("vram_free")}


class Reachability:
    """``targets`` returns (url, enabled) for every instance to watch; ``client`` makes an
    InstanceClient for a URL."""

    def __init__(self, targets: Callable[[], list[tuple[str, bool]]], client: Callable[[str], Any],
                 clock: Clock | None = None):
        self.targets = targets
        self.client = client
        self.clock = clock or Clock()
        self.seen: dict[str, Seen] = {}
        self._task: asyncio.Task | None = None
        self._checks: set[asyncio.Task] = set()
        self._enabled: dict[str, bool] = {}

    # --- reading ---------------------------------------------------------------------------------
    def get(self, url: str) -> Seen | None:
        return self.seen.get(url.rstrip("/"))

    def is_down(self, url: str) -> bool:
        seen = self.get(url)
        return seen is not None and seen.state == "down"

    def why(self, url: str) -> str:
        seen = self.get(url)
        return seen.error if seen is not None else ""

    # --- reports from checks and from other requests ----------------------------------------------
    def ok(self, url: str, stats: dict | None = None, queue: int | None = None) -> None:
        seen = self._entry(url)
        now = self.clock.now()
        if seen.state != "up":
            if seen.state == "down":
                log.info("[Distributed] %s answers again", seen.url)
            seen.state, seen.since = "up", now
        seen.error, seen.failures, seen.refusals, seen.last_ok = "", 0, 0, now
        if stats is not None:
            seen.stats = stats
        if queue is not None:
            seen.queue = queue

    def failed(self, url: str, error: str, refused: bool = False) -> None:
        seen = self._entry(url)
        now = self.clock.now()
        if seen.state != "down":
            seen.state, seen.since = "down", now
        seen.error = error
        seen.failures += 1
        seen.refusals = seen.refusals + 1 if refused else 0
        seen.queue = None

    def _entry(self, url: str) -> Seen:
        url = url.rstrip("/")
        seen = self.seen.get(url)
        if seen is None:
            seen = self.seen[url] = Seen(url, since=self.clock.now())
        return seen

    # --- the checks --------------------------------------------------------------------------------
    def start(self) -> None:
        """Start checking, on the running loop (once)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        for task in [self._task, *self._checks]:
            if task is not None:
                task.cancel()

    async def run(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - a bad config must not end the checks
                log.debug("[Distributed] reachability tick failed", exc_info=True)
            await self.clock.sleep(TICK)

    def tick(self) -> list[asyncio.Task]:
        """Start the checks that are due; forget instances no longer in the config."""
        now = self.clock.now()
        wanted = {url.rstrip("/"): enabled for url, enabled in self.targets()}
        for url in [u for u in self.seen if u not in wanted]:
            del self.seen[url]
        started = []
        for url, enabled in wanted.items():
            seen = self._entry(url)
            if self._enabled.get(url) is False and enabled:
                seen.next_check = now  # just enabled: check it at once
            self._enabled[url] = enabled
            if seen.checking or seen.next_check > now:
                continue
            seen.checking = True
            task = asyncio.get_running_loop().create_task(self.check(url, enabled))
            self._checks.add(task)
            task.add_done_callback(self._checks.discard)
            started.append(task)
        return started

    async def check(self, url: str, enabled: bool = True) -> None:
        from .client import InstanceError

        client = self.client(url)
        seen = self._entry(url)
        try:
            stats, queue = await asyncio.gather(client.system_stats(), client.queue_remaining())
        except InstanceError as exc:
            self.failed(url, str(exc), refused=exc.refused)
            # A refused connection costs nothing: keep the usual pace, so a worker that starts is
            # seen at once. One that does not answer (a timeout) is asked less and less often.
            wait = INTERVAL if exc.refused else min(INTERVAL * 2 ** max(0, seen.failures - 3), MAX_BACKOFF)
        else:
            self.ok(url, stats if isinstance(stats, dict) else {}, queue)
            wait = INTERVAL
        finally:
            seen.checking = False
        seen.next_check = self.clock.now() + (wait if enabled else max(wait, DISABLED_INTERVAL))

    async def settled(self, urls: list[str], timeout: float) -> None:
        """Wait (up to ``timeout``) until each of ``urls`` has had a first answer; changes nothing."""
        deadline = self.clock.now() + timeout
        while self.clock.now() < deadline:
            if all((s := self.get(u)) is not None and s.state != "unknown" for u in urls):
                return
            await self.clock.sleep(0.05)
