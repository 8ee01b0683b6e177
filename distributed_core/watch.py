"""Watching prompts that run on other instances: the one way every kind of job follows a worker's
prompt (and the master's own) to its end.

A watch reads only the history of its own prompt (through the jobs API where the worker has it),
the prompt nearest the head of an instance's queue most often, and an instance's whole queue at
most every QUEUE_MAX_AGE seconds, shared by every prompt watched there. Whoever learns that a
result has arrived wakes the watches under its key at once (``wake``).
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Callable

from .client import InstanceClient, InstanceError, history_error
from .reach import Clock, Reachability

POLL_SECONDS = 1.0      # how often the prompt nearest the head of a queue reads its history
MAX_POLL_SECONDS = 15.0  # ...and the one furthest back
QUEUE_MAX_AGE = 10.0    # an instance's whole queue (to find a prompt it lost) is read at most this often
REFUSALS_MEAN_GONE = 3  # checks in a row refused: the worker's process has died
FINISHED_GRACE = 5.0    # results are posted before a prompt ends: a finished prompt gets this long more
SHORT_QUEUE = 4         # a queue this long is read every second for a prompt whose start is awaited

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
    """One prompt that a worker runs for us, under watch (``Watcher.watch``): Collector
    shares, spread prompts and tile workers alike."""
    client: InstanceClient
    prompt_id: str
    dispatched: float                   # the fleet's clock when the worker accepted it
    wake_key: str                       # ``result_arrived(wake_key)`` makes the watch look at once
    is_open: Callable[[], bool]         # whoever sent it still waits for it
    delivered: Callable[[], bool]       # what it was sent for has reached the master
    grace: float | None = None          # a finished prompt whose results have not arrived gets this
    #                                     long more (they are posted before it ends); None: a prompt
    #                                     that ends without an error is done with
    on_running: Callable[[], None] | None = None  # told when a queue read shows it running
    relay_token: str | None = None      # the prompt's share token: the master keeps its relay open
    #                                     (relay.py) while it watches, and the prompt's work comes
    #                                     back over it
    client_id: str = ""                 # the client id it was queued under: its events come to that
    on_steps: Callable[[int, int], None] | None = None  # told (step, steps) as the worker samples



def steps_of(message: str, prompt_id: str) -> tuple[int, int] | None:
    """(step, steps) from one of ComfyUI's websocket messages when it is a ``progress`` event of
    this prompt (ComfyUI of early 2024 names no prompt in it); else None."""
    try:
        event = json.loads(message)
    except ValueError:
        return None
    data = event.get("data") if isinstance(event, dict) and event.get("type") == "progress" else None
    if not isinstance(data, dict) or data.get("prompt_id") not in (None, prompt_id):
        return None
    value, most = data.get("value"), data.get("max")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (value, most)) or most <= 0:
        return None
    return int(value), int(most)


class Watcher:
    """Every prompt under watch, by instance; the queue readings they share; the wake-ups by key."""

    def __init__(self, reach: Reachability, clock: Clock):
        self.reach = reach
        self.clock = clock
        self.wakeups: dict[str, asyncio.Event] = {}
        self.watching: dict[str, list[Watch]] = {}  # instance URL -> prompts watched there, oldest first
        self.queues: dict[str, _Queue] = {}

    def wake(self, key: str) -> None:
        """Wake whoever watches under ``key`` now rather than at its next poll. Each wake-up uses a
        fresh event, so nobody can clear one that another watcher has not seen yet."""
        event = self.wakeups.pop(key, None)
        if event is not None:
            event.set()

    def wake_all(self) -> None:
        for key in list(self.wakeups):
            self.wake(key)

    def queue_changed(self, url: str) -> None:
        """An instance's queue changed under our eyes (prompts deleted): read it again at the next
        chance, and wake every watch so that it looks."""
        entry = self.queues.get(url)
        if entry is not None:
            entry.tried_at = float("-inf")
        self.wake_all()

    def _short_queue(self, url: str) -> bool:
        """The instance's queue, as its reachability check last counted it, holds a few prompts at
        most (or has not been counted yet)."""
        seen = self.reach.get(url)
        return seen is None or seen.queue is None or seen.queue <= SHORT_QUEUE

    async def nap(self, key: str, seconds: float) -> None:
        """Sleep until ``wake(key)`` or ``seconds`` pass. Callers check their condition just
        before, with no await in between, so no wake-up is lost."""
        await self.clock.wait(self.wakeups.setdefault(key, asyncio.Event()), seconds)

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
                await self.nap(watched.wake_key, min(next_read - now, POLL_SECONDS))
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
                    # then, while that queue is short (a spread prompt: one per worker; a Collector
                    # share near the head); otherwise rarely, to find a lost one: a long queue is
                    # a large answer, and its prompts start one after another anyway
                    wants_running = watched.on_running is not None and not running_seen \
                        and self._short_queue(client.url)
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
                return "undelivered", ("its prompt finished but its results never reached the master "
                                       "over its relay")
            next_read = min(next_read, self.clock.now() + POLL_SECONDS)

    async def prompt_end(self, client: InstanceClient, prompt_id: str, since: float, wake_key: str,
                         fast: Callable[[], bool] = lambda: True,
                         on_running: Callable[[], None] | None = None) -> dict | None:
        """Wait until a prompt of our own instance has ended: its history entry, or None when it
        left the queue without one (deleted). Read like a worker's prompt (``fast()`` False reads
        at the slow pace); ``on_running`` is told once when a queue read shows it running."""
        marker = Watch(client, prompt_id, since, wake_key, lambda: True, lambda: False)
        self.watching.setdefault(client.url, []).append(marker)
        try:
            while True:
                if fast():
                    await self.nap(wake_key, self._poll_interval(client.url, marker))
                else:
                    await self.clock.sleep(POLL_SECONDS)
                try:
                    entry = await client.history(prompt_id)
                    if entry is None:
                        # read every second until it starts, for whoever wants to know, while the queue is short
                        wants_running = on_running is not None and self._short_queue(client.url)
                        queue = await self.queue_reading(
                            client, max(since, self.clock.now() - POLL_SECONDS) if wants_running else since,
                            POLL_SECONDS if wants_running else QUEUE_MAX_AGE)  # never a reading from before it
                        if queue is not None and prompt_id in queue.running and on_running is not None:
                            on_running()
                            on_running = None
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
