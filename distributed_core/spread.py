"""The spread queue: prompts without a Collector, each rendered whole by one participant.

Every prompt stays in the master's own ComfyUI queue, so its id, the queue view, deletion and the
history stay ComfyUI's. Two things pull from that queue, oldest first:

- the master's execution thread, through comfy_internals.QueueTap (installed over the queue's ``get``):
  it takes the first item that is either not a spread prompt, or a spread prompt nobody has
  claimed (the master renders it as submitted), or one whose worker values have arrived (or
  failed). It never blocks on a prompt that a worker is still rendering.
- the ``Dispatcher`` on the server's event loop: as soon as a worker is free it claims the oldest
  unclaimed spread prompt and sends that worker the upstream of the prompt's output nodes plus a
  sender node, which posts the values the output nodes take back to the master as one binary
  frame (wire.value_frame) with the claim's token.

When the master's thread reaches a prompt whose values have arrived, it runs a version of it in
which each node that fed an output node is replaced, under the same id, by a receiver node that
hands over the worker's values. The output nodes themselves run on the master: files, names,
history and websocket events are those of a local run. ComfyUI records the item as submitted (the
history keeps the original prompt) and the hidden PROMPT input that output nodes embed is given
the original prompt too (see ``SpreadState.original_prompt``).

Nothing here imports ComfyUI or touches its queue: comfy_internals does, and hands over its own
queue items, whose shape this module reads only through ``item_prompt`` and ``item_outputs``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from . import wire
from .comfy_internals import item_outputs, item_prompt
from .plan import MASTER_ID
from .workflow import COLLECTOR, FIELD, UPSCALE, WorkflowError, describe, is_link, read_field, upstream

log = logging.getLogger("comfyui-distributed")

RECEIVER = "DistributedSpreadReceiver"
SENDER = "DistributedSpreadSender"
SENDER_ID = "spread-sender"
# The types that output nodes take which travel from a worker to the master: tensors and what
# holds them (IMAGE, MASK, LATENT, AUDIO) and plain values.
TRAVELS = ("IMAGE", "MASK", "LATENT", "AUDIO", "INT", "FLOAT", "STRING", "BOOLEAN")
TICK_SECONDS = 0.5
FINISHED_GRACE = 5.0     # a worker prompt that finished gets this long more for its values to arrive
OFFLINE_SECONDS = 20.0   # a worker that failed a prompt is given no other for this long
RECENT = 64              # finished prompts the panel still lists
MAX_SLOTS = 32           # outputs of one node that the receiver can stand in for
CLIENT_ID = "comfyui-distributed-spread"


# --- which part runs where ----------------------------------------------------------------------

@dataclass(frozen=True)
class Split:
    """A spread prompt cut in two: the output nodes run on the master; ``sources`` (node id,
    output index, type) are the values they take, which one participant renders."""
    outputs: tuple[str, ...]
    sources: tuple[tuple[str, int, str], ...]

    def source_nodes(self) -> list[str]:
        return sorted({nid for nid, _index, _type in self.sources})

    def master_prompt(self, prompt: dict, key: str) -> dict:
        """The prompt as the master runs it once the values are in: every source node replaced,
        under its own id, by a receiver of its values. The rest stays, unexecuted, so that
        ComfyUI keeps what it has cached for those nodes."""
        result = dict(prompt)
        for nid in self.source_nodes():
            indexes = sorted({index for n, index, _type in self.sources if n == nid})
            node = {"class_type": RECEIVER,
                    "inputs": {FIELD: json.dumps({"spread": key, "node": nid, "outputs": indexes},
                                                 separators=(",", ":"))}}
            meta = prompt[nid].get("_meta") if isinstance(prompt[nid], dict) else None
            if isinstance(meta, dict):
                node["_meta"] = meta
            result[nid] = node
        return result

    def worker_prompt(self, prompt: dict, fields: dict) -> dict:
        """What a worker runs: the upstream of the source nodes and a sender node that takes each
        source value (inputs v0, v1, ... in the order of ``sources``) and posts them back."""
        keep = upstream(prompt, self.source_nodes())
        result = {nid: prompt[nid] for nid in keep}
        sender = SENDER_ID
        while sender in prompt:
            sender += "_"
        inputs: dict[str, Any] = {f"v{k}": [nid, index] for k, (nid, index, _type) in enumerate(self.sources)}
        inputs[FIELD] = json.dumps({**fields, "slots": [list(s) for s in self.sources]}, separators=(",", ":"))
        result[sender] = {"class_type": SENDER, "inputs": inputs}
        return result


def split(prompt: Any, outputs: Any, return_type: Callable[[str, int], str | None]) -> Split | str:
    """How a queued prompt spreads, or why it does not (a string). ``outputs`` are the output
    nodes ComfyUI will run (the queue item's last field); ``return_type(class_type, index)`` is
    a node class's declared output type."""
    if not isinstance(prompt, dict) or not isinstance(outputs, (list, tuple, set)):
        return "not a prompt"
    wanted = [str(o) for o in outputs if str(o) in prompt]
    if not wanted:
        return "it runs no output node"
    try:
        runs = upstream(prompt, wanted)
    except WorkflowError as exc:
        return str(exc)
    for nid in runs:
        kind = prompt[nid].get("class_type")
        if kind == COLLECTOR:
            return "it holds a Multi-GPU Collector"
        if kind == UPSCALE:
            return "it holds a Distributed Tiled Upscale, which uses every GPU already"
        if kind in (SENDER, RECEIVER):
            return "it is a spread prompt's own part"
    outs = set(wanted)
    sources: list[tuple[str, int, str]] = []
    for nid in sorted(outs):
        for value in (prompt[nid].get("inputs") or {}).values():
            if is_link(value) and str(value[0]) not in outs:
                key = (str(value[0]), int(value[1]))
                if not any(s[:2] == key for s in sources):
                    sources.append((*key, ""))
    if not sources:
        return "its output nodes take nothing that could be rendered elsewhere"
    typed = []
    for nid, index, _ in sources:
        if not 0 <= index < MAX_SLOTS:
            return f"{describe(prompt, nid)} output {index} is beyond the {MAX_SLOTS} that travel"
        kind = return_type(prompt[nid].get("class_type"), index)
        if kind not in TRAVELS:
            return (f"{describe(prompt, nid)} gives the output nodes a {kind or 'value of unknown type'}, "
                    f"which does not travel (only {', '.join(TRAVELS)} do)")
        typed.append((nid, index, kind))
    if upstream(prompt, [s[0] for s in typed]) & outs:
        return "an output node feeds a node before another output node"
    return Split(tuple(sorted(outs)), tuple(sorted(typed)))


def split_item(item: Any, return_type: Callable[[str, int], str | None]) -> Split | str:
    """How a queued item of ComfyUI's spreads (see ``split``), or why it does not."""
    prompt = item_prompt(item)
    if prompt is None:
        return "its queue item is not shaped as this extension knows"
    return split(prompt, item_outputs(item), return_type)


# --- values as a tree of plain data and arrays ----------------------------------------------------

def flatten(value: Any, arrays: list, to_array: Callable[[Any], tuple[Any, str] | None]) -> Any:
    """A JSON tree for ``value`` whose tensors are appended to ``arrays`` as (numpy array, dtype
    name). ``to_array`` turns one tensor into that pair, or None for what is not a tensor."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("a dict with keys that are not text cannot travel")
        return {"d": {k: flatten(v, arrays, to_array) for k, v in value.items()}}
    if isinstance(value, list):
        return {"l": [flatten(v, arrays, to_array) for v in value]}
    if isinstance(value, tuple):
        return {"t": [flatten(v, arrays, to_array) for v in value]}
    converted = to_array(value)
    if converted is None:
        raise TypeError(f"a value of type {type(value).__name__} cannot travel from a worker to the master")
    arrays.append(converted)
    return {"a": len(arrays) - 1}


def unflatten(tree: Any, arrays: list, from_array: Callable[[Any, str], Any]) -> Any:
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    if not isinstance(tree, dict) or len(tree) != 1:
        raise wire.FrameError("malformed value tree")
    (tag, inner), = tree.items()
    if tag == "d" and isinstance(inner, dict):
        return {k: unflatten(v, arrays, from_array) for k, v in inner.items()}
    if tag == "l" and isinstance(inner, list):
        return [unflatten(v, arrays, from_array) for v in inner]
    if tag == "t" and isinstance(inner, list):
        return tuple(unflatten(v, arrays, from_array) for v in inner)
    if tag == "a" and isinstance(inner, int) and not isinstance(inner, bool) and 0 <= inner < len(arrays):
        array, dtype = arrays[inner]
        return from_array(array, dtype)
    raise wire.FrameError(f"malformed value tree (tag {tag!r})")


def to_array(value) -> tuple[Any, str] | None:
    """A torch tensor (or numpy array) as (numpy array, dtype name) for the wire; None for
    anything else. bfloat16 travels as its raw 16 bits."""
    import numpy as np
    import torch

    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        return None
    value = value.detach().to("cpu").contiguous()
    if value.dtype == torch.bfloat16:
        return value.view(torch.int16).numpy().view(np.uint16), "bfloat16"
    name = str(value.dtype).removeprefix("torch.")
    if name not in wire.VALUE_DTYPES:
        raise TypeError(f"a tensor of {value.dtype} cannot travel from a worker to the master")
    return value.numpy(), name


def from_array(array, dtype: str):
    """The torch tensor (on the CPU) for an array that arrived."""
    import numpy as np
    import torch

    if dtype == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def decode_values(tree: Any, arrays: list) -> dict:
    """A worker's values as the receivers hand them over: source node -> {output index: the list
    of values ComfyUI keeps for that output}. Raises wire.FrameError."""
    slots = unflatten(tree, arrays, from_array)
    if not isinstance(slots, list) or not all(isinstance(s, dict) and isinstance(s.get("values"), list)
                                              and isinstance(s.get("index"), int) for s in slots):
        raise wire.FrameError("the value tree must be a list of {node, index, values}")
    values: dict = {}
    for slot in slots:
        values.setdefault(str(slot.get("node")), {})[slot["index"]] = slot["values"]
    return values


def encode_values(prompt_id: str, token: str, slots: list, values: dict) -> list:
    """The value frame a worker's sender posts: ``slots`` as in its field, ``values`` its inputs
    (v0, v1, ...: each the list of values ComfyUI keeps for that output)."""
    arrays: list = []
    tree = flatten([{"node": str(node), "index": int(index), "values": list(values.get(f"v{k}") or [])}
                    for k, (node, index, _kind) in enumerate(slots)], arrays, to_array)
    return wire.value_frame(prompt_id, token, tree, arrays)


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
    dispatched: float = 0.0       # the coordinator's clock when the worker accepted its prompt

    def summary(self) -> dict:
        return {"prompt_id": self.prompt_id, "participant": self.participant, "name": self.label,
                "state": self.state, "error": self.error, "since": self.since}


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
                    self.claims[pid] = Claim(pid, MASTER_ID, "master", "master", number=item[0])
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
                    claim = self.claims[pid] = Claim(pid, worker_id, label, number=item[0])
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
    and moves it on when the worker fails. ``coord`` is the Coordinator (its HTTP clients, the
    master's address for a worker, input sync, task spawning and Collector jobs)."""

    def __init__(self, state: SpreadState, tap, planner: Callable[[Any], Split | str], coord, load_config: Callable,
                 emit: Callable[[dict], None] = lambda summary: None,
                 config_path: Callable[[], Any] | None = None):
        self.state = state
        self.tap = tap          # comfy_internals.QueueTap: what the master's queue holds
        self.planner = planner  # a queued item's Split, or why it does not spread
        self.coord = coord
        self.load_config = load_config
        self.config_path = config_path or (lambda: None)
        self._config_key = None
        self.emit = emit
        self.config = load_config().config
        self.failed_until: dict[str, float] = {}
        self.probe_after: dict[str, float] = {}  # workers kept out until they answer again
        self.wake_event: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.tasks: set[asyncio.Task] = set()
        self.last_emitted: list = []

    # --- whom a prompt may go to ------------------------------------------------------------------
    def reachable(self, worker) -> bool:
        """Whether a worker may be given a prompt now: the master's reachability checks do not see
        it down, and it is not kept out after failing a prompt of the spread queue."""
        return self.failed_until.get(worker.id, 0) <= time.monotonic() and not self.coord.reach.is_down(worker.url)

    def enabled(self) -> bool:
        return bool(self.config.settings.spread_queue) and not self.coord.is_worker_instance(self.config)

    def usable_workers(self) -> list:
        return [w for w in self.config.workers if w.enabled and self.reachable(w)]

    def master_renders(self) -> bool:
        """The master takes spread prompts itself when enabled, or when no worker is left."""
        return self.config.master.enabled or not self.usable_workers()

    def collector_busy(self) -> set[str]:
        """Workers with an unfinished share of a Collector job: they get no spread prompt until it
        is done, so Collector jobs are never stuck behind a queue of spread prompts."""
        busy = set()
        for job in self.coord.store.active():
            for share in job.shares.values():
                if share.participant != MASTER_ID and share.state not in ("done", "failed", "cancelled"):
                    busy.add(share.participant)
        return busy

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
            self.spawn(self.withdraw(claim, "the prompt was deleted from the master's queue"))
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
            self.spawn(self.render(worker, claim, item, plan))
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
                self.spawn(self._probe(worker))

    async def _probe(self, worker) -> None:
        from .client import InstanceError
        try:
            await self.coord.client(worker.url).queue_remaining()
        except InstanceError:
            return
        self.failed_until.pop(worker.id, None)
        self.probe_after.pop(worker.id, None)
        self.wake()

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("[Distributed] spread queue internal error", exc_info=task.exception())

    # --- one prompt on one worker --------------------------------------------------------------------
    async def render(self, worker, claim: Claim, item, plan: Split) -> None:
        from .client import InstanceError

        config = self.config
        client = self.coord.client(worker.url)
        fields = {"spread": claim.prompt_id, "token": claim.token, "timeout": config.settings.job_timeout,
                  "master_url": self.coord.master_url_for(config, worker)}
        prompt = plan.worker_prompt(item_prompt(item), fields)
        try:
            if not worker.is_local and not config.master.host and self.coord.loopback_only():
                raise InstanceError(f"it is on another machine ({worker.host}) but this master listens on "
                                    "127.0.0.1 only; start the master with --listen, or set master.host")
            await self.coord.sync_inputs(client, prompt)
            claim.worker_prompt_id = await client.post_prompt(prompt, CLIENT_ID)
        except InstanceError as exc:
            self.move(claim, worker.id, str(exc))
            return
        log.info("[Distributed] prompt %s goes to %s", claim.prompt_id[:8], worker.label)
        if self.state.claim_of(claim.prompt_id) is not claim:  # deleted while we were sending it
            await self._quietly(client.withdraw(claim.worker_prompt_id))
            return
        claim.dispatched = self.coord.clock.now()
        self.state.set_state(claim.prompt_id, worker.id, "queued")
        await self.supervise(worker, claim, client, float(config.settings.job_timeout))
        self.wake()

    async def supervise(self, worker, claim: Claim, client, timeout: float) -> None:
        """Watch the worker's prompt (the coordinator's one way of watching worker prompts) and
        move it on when the worker fails; an error in the prompt itself fails it on the master."""
        from .coordinator import Watch

        def is_open() -> bool:
            return self.state.claim_of(claim.prompt_id) is claim and claim.state in ("sent", "queued", "running")

        watched = Watch(client, claim.worker_prompt_id, claim.dispatched, claim.prompt_id, is_open,
                        lambda: claim.state == "arrived", grace=FINISHED_GRACE,
                        on_running=lambda: self.state.set_state(claim.prompt_id, worker.id, "running"))
        outcome, why = await self.coord.watch(watched, timeout)
        if outcome == "error" and "interrupted" not in why:
            self.state.fail(claim.prompt_id, f"{worker.label}: {why}")
        elif outcome in ("error", "lost"):  # someone stopped it there, or the worker failed: elsewhere
            self.move(claim, worker.id, why)
            await self._quietly(client.withdraw(claim.worker_prompt_id))
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
        await self._quietly(self.coord.client(worker.url).withdraw(claim.worker_prompt_id))

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

    @staticmethod
    async def _quietly(coro) -> None:
        from .client import InstanceError
        try:
            await coro
        except InstanceError:
            pass


def seal(prompt: Any, keep: Callable[[str], str]) -> Any:
    """A sender prompt as a worker queues it: each token moved out (``keep`` holds it and returns
    a key), so that the worker's GET /queue and /history name no credential."""
    if not isinstance(prompt, dict):
        return prompt
    result = prompt
    for nid, node in prompt.items():
        if not isinstance(node, dict) or node.get("class_type") != SENDER:
            continue
        found = sender_field(prompt, nid)
        if not found or not isinstance(found.get("token"), str):
            continue
        key = keep(found.pop("token"))
        result = dict(result) if result is prompt else result
        inputs = dict(node.get("inputs") or {})
        inputs[FIELD] = json.dumps({**found, "sealed": key}, separators=(",", ":"))
        result[nid] = {**node, "inputs": inputs}
    return result


def sender_field(prompt: Any, node_id: Any) -> dict | None:
    field_ = read_field(prompt, node_id)
    return field_ if field_ and "spread" in field_ else None


# --- the values a worker sends -------------------------------------------------------------------------

async def receive_values(reader, content_length: int | None, check: Callable[[wire.ValueHeader], None]):
    """Read one value frame: check its header (``check`` raises to refuse), then stream each array
    into place. Returns (header, [(array, dtype name)]). Raises wire.Rejected."""
    import numpy as np

    header = await wire.read_header(reader, content_length, "value frame",
                                    wire.value_header_length, wire.parse_value_header)
    check(header)
    arrays = []
    for dtype, shape in header.arrays:
        array = np.empty(shape, dtype=wire.VALUE_DTYPES[dtype])
        await wire.read_into(reader, memoryview(array.reshape(-1).view(np.uint8)), "value frame")
        arrays.append((array, dtype))
    await wire.read_end(reader)
    return header, arrays
