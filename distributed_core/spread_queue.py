"""The spread queue: prompts without a Collector, each rendered whole by one participant (which
part runs where, and the values' wire format, are in spread.py).

Every prompt stays in the master's own ComfyUI queue, so its id, the queue view, deletion and the
history stay ComfyUI's. Two things pull from that queue, oldest first:

- the master's execution thread, through comfy_internals.QueueTap (installed over the queue's ``get``):
  it takes the first item that is either not a spread prompt, or a spread prompt nobody has
  claimed (the master renders it as submitted), or one whose worker values have arrived (or
  failed). It never blocks on a prompt that a worker is still rendering.
- the ``Dispatcher`` on the server's event loop: as soon as a worker of the fleet is free it claims
  the oldest unclaimed spread prompt and sends it that prompt's worker version (spread.Split).

ComfyUI records the item as submitted (the history keeps the original prompt) and the hidden
PROMPT input that output nodes embed is given the original prompt too (see
``SpreadState.original_prompt``).

Nothing here imports ComfyUI or touches its queue: comfy_internals does, and hands over its own
queue items, whose shape this module reads only through ``item_prompt``.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from . import values, wire
from . import comfy_internals
from .comfy_internals import item_prompt
from .fleet import Unusable
from .plan import MASTER_ID
from .spread import Split, split_item
from .watch import Watch

log = logging.getLogger("comfyui-distributed")

TICK_SECONDS = 0.5
FINISHED_GRACE = 5.0     # a worker prompt that finished gets this long more for its values to arrive
OFFLINE_SECONDS = 20.0   # a worker that failed a prompt is given no other for this long
RECENT = 64              # finished prompts the panel still lists
CLIENT_ID = "comfyui-distributed-spread"


# --- who renders what ------------------------------------------------------------------------------

class Interrupted(RuntimeError):
    """The prompt was interrupted on the master while a worker rendered it."""


@dataclass
class Claim:
    prompt_id: str
    participant: str
    label: str
    state: str = "sent"       # master | sent | queued | running | arrived | failed | taken
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    worker_prompt_id: str = ""
    since: float = field(default_factory=time.time)
    values: dict | None = None    # source node -> {output index: list of values}
    error: str = ""
    number: float = 0.0
    interrupted: bool = False
    dispatched: float = 0.0       # the fleet's clock when the worker accepted its prompt
    value_labels: list = field(default_factory=list)  # its Distributed Values, as the panel shows them

    def summary(self) -> dict:
        # the master's own claim is made when it starts to run the prompt: it is running there
        shown = "running" if self.state == "master" else self.state
        return {"prompt_id": self.prompt_id, "participant": self.participant, "name": self.label,
                "state": shown, "error": self.error, "since": self.since, "values": list(self.value_labels)}


class SpreadState:
    """Claims on the master's queued prompts. Every change happens under ``lock``, which the glue
    makes the queue's own mutex, so the execution thread and the event loop see one truth."""

    def __init__(self, lock=None):
        self.lock = lock if lock is not None else threading.RLock()
        self.claims: dict[str, Claim] = {}
        self.plans: dict[str, Split | str] = {}
        self.avoid: dict[str, set[str]] = {}           # prompt id -> workers that failed it
        self.recent: deque[dict] = deque(maxlen=RECENT)
        self._originals: dict[int, tuple[dict, dict]] = {}  # id(run prompt) -> (run prompt, submitted)

    # planning, cached per prompt id (a queued prompt does not change)
    def plan(self, item, planner: Callable[[Any], Split | str]) -> Split | str:
        pid = str(item[1])
        found = self.plans.get(pid)
        if found is None:
            try:
                found = planner(item)
            except Exception as exc:  # noqa: BLE001 - a prompt we cannot read is rendered as submitted
                found = f"not planned: {exc}"
            self.plans[pid] = found
        return found

    def pick_for_master(self, items: list, master_renders: Callable[[], bool],
                        planner: Callable[[Any], Split | str]) -> tuple[Any, dict | None] | None:
        """(queued item to run, the prompt to run it as, or None to run it as submitted) for the
        master's execution thread, oldest first; None when every waiting prompt is a spread
        prompt that a worker renders, or that waits for one. The item itself is never rebuilt."""
        with self.lock:
            for item in sorted(items):
                pid = str(item[1])
                plan = self.plan(item, planner)
                if not isinstance(plan, Split):
                    return item, None
                claim = self.claims.get(pid)
                if claim is None:
                    if not master_renders():
                        continue
                    self.claims[pid] = Claim(pid, MASTER_ID, "master", "master", number=item[0],
                                             value_labels=values.labels(item_prompt(item), [MASTER_ID]))
                    return item, None
                if claim.state in ("arrived", "failed"):
                    claim.state = "taken" if claim.state == "arrived" else claim.state
                    return item, plan.master_prompt(item_prompt(item), pid)
        return None

    def swapped(self, run: dict, submitted: dict) -> None:
        """The master runs ``run`` (the queue item's own prompt, given the receiver version) for a
        prompt submitted as ``submitted``: output nodes embed the latter (``original_prompt``)."""
        with self.lock:
            self._originals[id(run)] = (run, submitted)
            while len(self._originals) > 16:
                self._originals.pop(next(iter(self._originals)))

    def pick_for_worker(self, items: list, worker_id: str, label: str,
                        planner: Callable[[Any], Split | str]) -> tuple[Claim, Any, Split] | None:
        """Claim the oldest spread prompt nobody has claimed (and this worker has not failed)."""
        with self.lock:
            for item in sorted(items):
                pid = str(item[1])
                if pid in self.claims or worker_id in self.avoid.get(pid, ()):
                    continue
                plan = self.plan(item, planner)
                if isinstance(plan, Split):
                    claim = self.claims[pid] = Claim(pid, worker_id, label, number=item[0],
                                                     value_labels=values.labels(item_prompt(item), [worker_id]))
                    return claim, item, plan
        return None

    def busy(self) -> set[str]:
        """Workers rendering a spread prompt now."""
        with self.lock:
            return {c.participant for c in self.claims.values()
                    if c.participant != MASTER_ID and c.state in ("sent", "queued", "running")}

    def claim_of(self, prompt_id: str) -> Claim | None:
        with self.lock:
            return self.claims.get(prompt_id)

    def check(self, prompt_id: str, token: str) -> Claim:
        """The claim a worker's frame belongs to; raises LookupError/PermissionError/ValueError."""
        with self.lock:
            claim = self.claims.get(prompt_id)
            if claim is None or claim.participant == MASTER_ID:
                raise LookupError(f"no spread prompt {prompt_id} is waiting for a worker on this master")
            if not wire.same_token(token, claim.token):
                raise PermissionError("wrong token for this spread prompt")
            if claim.state not in ("sent", "queued", "running"):
                raise ValueError(f"spread prompt {prompt_id} is {claim.state}; values discarded")
            return claim

    def arrive(self, prompt_id: str, token: str, values: dict) -> Claim:
        with self.lock:
            claim = self.check(prompt_id, token)
            claim.values, claim.state = values, "arrived"
            self._notify()
            return claim

    def fail(self, prompt_id: str, message: str) -> None:
        """The worker reported an error: the master's prompt fails with it."""
        with self.lock:
            claim = self.claims.get(prompt_id)
            if claim is not None and claim.state in ("sent", "queued", "running"):
                claim.state, claim.error = "failed", message
                self._notify()

    def interrupt(self, prompt_id: str) -> Claim | None:
        """Interrupted on the master (ComfyUI's POST /interrupt naming it): the master's run of it
        ends as interrupted; returns the claim, for its worker prompt to be withdrawn."""
        with self.lock:
            claim = self.claims.get(prompt_id)
            if claim is None or claim.participant == MASTER_ID or claim.state not in ("sent", "queued", "running"):
                return None
            claim.state, claim.error, claim.interrupted = "failed", "interrupted on the master", True
            self._notify()
            return claim

    def requeue(self, prompt_id: str, worker_id: str, reason: str) -> bool:
        """The worker died or froze: the prompt waits again for whoever is free next."""
        with self.lock:
            claim = self.claims.get(prompt_id)
            if claim is None or claim.participant != worker_id or claim.state not in ("sent", "queued", "running"):
                return False
            del self.claims[prompt_id]
            self.avoid.setdefault(prompt_id, set()).add(worker_id)
            self.recent.appendleft({**claim.summary(), "state": "moved", "error": reason})
            self._notify()
            return True

    def set_state(self, prompt_id: str, worker_id: str, state: str) -> None:
        with self.lock:
            claim = self.claims.get(prompt_id)
            if claim is not None and claim.participant == worker_id and claim.state in ("sent", "queued", "running"):
                claim.state = state

    def take_values(self, prompt_id: str, node: str) -> dict:
        """The receiver of ``node`` takes its values (on the execution thread). Raises
        RuntimeError with the worker's message when its prompt failed there."""
        with self.lock:
            claim = self.claims.get(prompt_id)
            if claim is None:
                raise RuntimeError(f"the values of spread prompt {prompt_id} are gone (was it withdrawn?)")
            if claim.state == "failed":
                raise (Interrupted if claim.interrupted else RuntimeError)(claim.error)
            if claim.values is None or node not in claim.values:
                raise RuntimeError(f"no values for node {node} of spread prompt {prompt_id}")
            return claim.values.pop(node)

    def prune(self, present: set[str]) -> list[Claim]:
        """Forget prompts that are neither queued nor running; returns the claims that a worker
        still renders (deleted from the master's queue: to withdraw)."""
        withdrawn = []
        with self.lock:
            for pid in [p for p in self.claims if p not in present]:
                claim = self.claims.pop(pid)
                if claim.state in ("sent", "queued", "running"):
                    withdrawn.append(claim)
                    self.recent.appendleft({**claim.summary(), "state": "withdrawn"})
                else:
                    self.recent.appendleft({**claim.summary(),
                                            "state": "done" if claim.state in ("taken", "master") else claim.state})
            for cache in (self.plans, self.avoid):
                for pid in [p for p in cache if p not in present]:
                    del cache[pid]
        return withdrawn

    def rendered_since(self, prompt_id: str) -> float | None:
        """When the worker that rendered this prompt was handed it (seconds since the epoch), for
        the master's record of it; None for a prompt that the master rendered itself."""
        with self.lock:
            claim = self.claims.get(prompt_id)
            return claim.since if claim is not None and claim.participant != MASTER_ID and claim.state == "taken" else None

    def original_prompt(self, value: Any) -> Any:
        """The submitted prompt for a prompt the master runs with receivers, else ``value``."""
        found = self._originals.get(id(value))
        return found[1] if found is not None and found[0] is value else value

    def summary(self) -> list[dict]:
        with self.lock:
            return [c.summary() for c in sorted(self.claims.values(), key=lambda c: c.number)]

    def _notify(self) -> None:
        notify = getattr(self.lock, "notify_all", None)
        if notify is not None:
            notify()


# --- handing prompts to workers ----------------------------------------------------------------------

class Dispatcher:
    """On the event loop: gives each free worker the oldest unclaimed spread prompt, watches it,
    and moves it on when the worker fails. The workers, their clients and the watching of their
    prompts come from the fleet (fleet.py)."""

    def __init__(self, state: SpreadState, tap, planner: Callable[[Any], Split | str], fleet, load_config: Callable,
                 emit: Callable[[dict], None] = lambda summary: None,
                 config_path: Callable[[], Any] | None = None):
        self.state = state
        self.tap = tap          # comfy_internals.QueueTap: what the master's queue holds
        self.planner = planner  # a queued item's Split, or why it does not spread
        self.fleet = fleet
        self.load_config = load_config
        self.config_path = config_path or (lambda: None)
        self._config_key = None
        self.emit = emit
        self.config = load_config().config
        self.failed_until: dict[str, float] = {}
        self.probe_after: dict[str, float] = {}  # workers kept out until they answer again
        self.wake_event: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.last_emitted: list = []

    # --- whom a prompt may go to ------------------------------------------------------------------
    def reachable(self, worker) -> bool:
        """Whether a worker may be given a prompt now: the master's reachability checks do not see
        it down, and it is not kept out after failing a prompt of the spread queue."""
        return self.failed_until.get(worker.id, 0) <= time.monotonic() and not self.fleet.reach.is_down(worker.url)

    def enabled(self) -> bool:
        return bool(self.config.settings.spread_queue) and not self.fleet.is_worker_instance(self.config)

    def usable_workers(self) -> list:
        return [w for w in self.config.workers if w.enabled and self.reachable(w)]

    def master_renders(self) -> bool:
        """The master takes spread prompts itself when enabled, or when no worker is left."""
        return self.config.master.enabled or not self.usable_workers()

    def collector_busy(self) -> set[str]:
        """Workers with an unfinished share of a Collector job: they get no spread prompt until it
        is done, so Collector jobs are never stuck behind a queue of spread prompts."""
        return self.fleet.busy()

    # --- the loop -------------------------------------------------------------------------------------
    def wake(self) -> None:
        """Look again now (from any thread)."""
        if self.loop is not None and self.wake_event is not None:
            self.loop.call_soon_threadsafe(self.wake_event.set)

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.wake_event = asyncio.Event()
        while True:
            try:
                await asyncio.wait_for(self.wake_event.wait(), TICK_SECONDS)
            except asyncio.TimeoutError:
                pass
            self.wake_event.clear()
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - keep dispatching
                log.exception("[Distributed] spread queue")

    def refresh(self) -> None:
        """Read the config again if its file changed (cheap enough for every pick)."""
        try:
            path = self.config_path()
            stat = path.stat()
            key = (str(path), stat.st_mtime_ns, stat.st_size)
        except (OSError, AttributeError):
            key = None
        if key is None or key != self._config_key:
            self.config = self.load_config().config
            self._config_key = key

    async def tick(self) -> None:
        self.refresh()
        items, present = self.tap.present()
        for claim in self.state.prune(present):
            self.fleet.spawn(self.withdraw(claim, "the prompt was deleted from the master's queue"))
        if not self.enabled() or not items:
            return
        self.recheck()
        busy = self.state.busy() | self.collector_busy()
        for worker in self.usable_workers():
            if worker.id in busy:
                continue
            picked = self.state.pick_for_worker(items, worker.id, worker.label, self.planner)
            if picked is None:
                break
            claim, item, plan = picked
            self.fleet.spawn(self.render(worker, claim, item, plan))
        summary = self.state.summary()
        if summary != self.last_emitted:
            self.last_emitted = summary
            self.emit({"prompts": summary})

    def recheck(self) -> None:
        """A worker kept out because it died or froze is asked again every few seconds; once it
        answers (restarted, thawed) it takes prompts again."""
        now = time.monotonic()
        for worker_id in [w for w, until in self.failed_until.items() if until > now and w in self.probe_after]:
            if self.probe_after[worker_id] > now:
                continue
            self.probe_after[worker_id] = now + 2.0
            worker = self.config.worker(worker_id)
            if worker is not None:
                self.fleet.spawn(self._probe(worker))

    async def _probe(self, worker) -> None:
        from .client import InstanceError
        try:
            await self.fleet.client(worker.url).queue_remaining()
        except InstanceError:
            return
        self.failed_until.pop(worker.id, None)
        self.probe_after.pop(worker.id, None)
        self.wake()

    # --- one prompt on one worker --------------------------------------------------------------------
    async def render(self, worker, claim: Claim, item, plan: Split) -> None:
        config = self.config
        fields = {"spread": claim.prompt_id, "token": claim.token, "timeout": config.settings.job_timeout}
        prompt = values.with_items(plan.worker_prompt(item_prompt(item), fields), [worker.id])  # its own values
        try:
            client, claim.worker_prompt_id = await self.fleet.send(worker, prompt, config, CLIENT_ID)
        except Unusable as exc:
            self.move(claim, worker.id, str(exc))
            return
        log.info("[Distributed] prompt %s goes to %s", claim.prompt_id[:8], worker.label)
        if self.state.claim_of(claim.prompt_id) is not claim:  # deleted while we were sending it
            await self.fleet.withdraw(worker.url, claim.worker_prompt_id, worker.label)
            return
        claim.dispatched = self.fleet.clock.now()
        self.state.set_state(claim.prompt_id, worker.id, "queued")
        await self.supervise(worker, claim, client, float(config.settings.job_timeout))
        self.wake()

    async def supervise(self, worker, claim: Claim, client, timeout: float) -> None:
        """Watch the worker's prompt (the fleet's one way of watching worker prompts) and move it
        on when the worker fails; an error in the prompt itself fails it on the master."""
        def is_open() -> bool:
            return self.state.claim_of(claim.prompt_id) is claim and claim.state in ("sent", "queued", "running")

        watched = Watch(client, claim.worker_prompt_id, claim.dispatched, claim.prompt_id, is_open,
                        lambda: claim.state == "arrived", grace=FINISHED_GRACE,
                        on_running=lambda: self.state.set_state(claim.prompt_id, worker.id, "running"),
                        relay_token=claim.token)
        outcome, why = await self.fleet.watch(watched, timeout)
        if outcome == "error" and "interrupted" not in why:
            self.state.fail(claim.prompt_id, f"{worker.label}: {why}")
        elif outcome in ("error", "lost"):  # someone stopped it there, or the worker failed: elsewhere
            self.move(claim, worker.id, why)
            await self.fleet.withdraw(worker.url, claim.worker_prompt_id, worker.label)
        elif outcome == "undelivered":
            self.move(claim, worker.id, why, recheck=False)

    def move(self, claim: Claim, worker_id: str, reason: str, recheck: bool = True) -> None:
        """Put the prompt back for whoever is free next, and keep this worker out for a while
        (``recheck``: until it answers again; else for OFFLINE_SECONDS)."""
        kept_out = self.failed_until.get(worker_id)
        self.failed_until[worker_id] = time.monotonic() + OFFLINE_SECONDS  # before the master looks again
        if not self.state.requeue(claim.prompt_id, worker_id, reason):
            if kept_out is None:
                self.failed_until.pop(worker_id, None)
            else:
                self.failed_until[worker_id] = kept_out
            return
        if True:
            log.warning("[Distributed] %s failed prompt %s: %s; it goes to whoever is free next",
                        claim.label, claim.prompt_id[:8], reason)
            if recheck:
                self.probe_after[worker_id] = time.monotonic() + 1.0
            else:
                self.probe_after.pop(worker_id, None)
            self.wake()

    async def withdraw(self, claim: Claim, reason: str) -> None:
        worker = self.config.worker(claim.participant)
        if worker is None or not claim.worker_prompt_id:
            return
        log.info("[Distributed] prompt %s withdrawn from %s: %s", claim.prompt_id[:8], claim.label, reason)
        await self.fleet.withdraw(worker.url, claim.worker_prompt_id, claim.label)

    async def interrupt(self, prompt_id: str) -> bool:
        claim = self.state.interrupt(prompt_id)
        if claim is not None:
            await self.withdraw(claim, "interrupted on the master")
        return claim is not None

    async def withdraw_all(self, reason: str) -> None:
        """Take back every prompt the workers render (the panel's interrupt)."""
        with self.state.lock:
            claims = [c for c in self.state.claims.values() if c.state in ("sent", "queued", "running")]
        for claim in claims:
            self.state.fail(claim.prompt_id, f"interrupted: {reason}")
            await self.withdraw(claim, reason)


def install(queue, fleet, return_type: Callable[[str, int], str | None], load_config: Callable,
            emit: Callable[[dict], None], config_path: Callable[[], Any]) -> tuple[Dispatcher | None, str]:
    """The spread queue over the master's ComfyUI queue: (its Dispatcher, "") once installed, or
    (None, why not) for a queue of another shape, which is then left as it is."""
    problem = comfy_internals.queue_problem(queue)
    if problem:
        log.warning("[Distributed] the spread queue is off: %s", problem)
        return None, problem
    state = SpreadState(lock=queue.not_empty)

    def planner(item):
        return split_item(item, return_type)

    def active() -> bool:
        return dispatcher.enabled() or any(c.participant != MASTER_ID for c in state.claims.values())

    tap = comfy_internals.QueueTap(queue, lambda items: state.pick_for_master(items, dispatcher.master_renders, planner),
                                   active, on_swap=state.swapped, refresh=lambda: dispatcher.refresh())
    dispatcher = Dispatcher(state, tap, planner, fleet, load_config, emit=emit, config_path=config_path)
    tap.install()
    comfy_internals.wrap_put(queue, dispatcher.wake)
    if not comfy_internals.restore_hidden_prompt(state.original_prompt):
        log.warning("[Distributed] files of spread prompts embed the prompt the master ran, not the one submitted")
    if not comfy_internals.retime_finished(queue, state.rendered_since):
        log.info("[Distributed] the Queue tab times spread prompts by the master's part of them")
    return dispatcher, ""
