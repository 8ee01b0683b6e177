"""The extension's one runtime object: the fleet, the three kinds of job beside it, and the worker
credentials. Setup (distributed_routes.setup) builds it once and hands it to the routes and the
nodes.

It also holds what every kind of job shares at submission: ComfyUI's prompt hook (``rewrite``),
which screens a prompt and lets each kind plan its part in turn, and the bookkeeping of one
POST /prompt (``submission``): the jobs it planned start once the master has accepted the prompt,
and are dropped otherwise. A fourth kind of job is one more entry in ``kinds``.

    runtime ── fleet ── reach (who answers), watcher (prompts under watch), clients
            ├─ collectors (collector_jobs.CollectorJobs) ─┐
            ├─ upscales   (upscale.Upscales)             ├─ each uses the fleet, never each other
            ├─ spread     (spread_queue.Dispatcher, or None) ─┘
            ├─ inbox      (answers what worker prompts send back over their relays)
            ├─ vault      (credentials of prompts sent here as a worker)
            └─ relays     (as a worker: the relays its masters opened, by credential)
"""
from __future__ import annotations

import contextvars
import logging
from typing import Any, Protocol

from . import plan, spread, spread_queue, values, workflow
from .collector_jobs import CollectorJobs, PlanRefused
from .fleet import Fleet
from .inbox import Inbox
from .jobs import JobState, JobStore
from .upscale import Upscales
from .relay import Relays
from .vault import Vault

log = logging.getLogger("comfyui-distributed")

# Jobs planned during the POST /prompt request being handled: (kind, job id) pairs.
submitted: contextvars.ContextVar[list | None] = contextvars.ContextVar("distributed_submitted", default=None)
# Why the prompt hook refused the POST /prompt being handled; the middleware answers with it.
refused: contextvars.ContextVar[list | None] = contextvars.ContextVar("distributed_refused", default=None)


class JobKind(Protocol):
    """A kind of job: it plans its part of a submitted prompt, and starts or drops what it planned."""

    def rewrite(self, json_data: dict, prompt: dict, targets: list | None, pending: list | None) -> dict: ...
    async def start(self, job_id: str, prompt_id: str) -> None: ...
    def drop(self, job_id: str, reason: str) -> None: ...


class Runtime:
    def __init__(self, fleet: Fleet, store: JobStore | None = None, partial_execution: bool = False):
        self.fleet = fleet
        self.vault = Vault()  # result tokens of worker-role prompts sent to this instance
        self.relays = Relays(self.vault.holds)  # as a worker: how those prompts reach their master
        self.vault.on_take = self.relays.expect
        self.inbox = Inbox(self)  # as a master: what its workers' prompts send back
        fleet.answer = self.inbox.answer
        self.collectors = CollectorJobs(fleet, store or JobStore())
        self.upscales = Upscales(fleet)
        self.kinds: list[JobKind] = [self.upscales, self.collectors]  # planned in this order
        self.partial_execution = partial_execution  # ComfyUI runs only partial_execution_targets
        # (class_type, input) -> the input's spec on this instance, for Distributed Values (the glue's)
        self.input_spec: values.InputSpec | None = None
        self.ray = None  # ray_workers.RayWorkers, which the glue sets up (the panel shows its view)
        # the spread queue (spread.py) once the glue has installed it on ComfyUI's queue; else why not
        self.spread: spread_queue.Dispatcher | None = None
        self.spread_unsupported = "the spread queue was not set up"

    # --- the prompt hook (synchronous, inside POST /prompt) -----------------------------------------
    def rewrite(self, json_data: Any) -> Any:
        """ComfyUI's prompt hook. A prompt that holds a Collector but cannot be planned is refused
        with the reason (POST /prompt answers 400 before anything renders). A prompt too malformed
        to be a prompt at all is passed on untouched, with nothing registered: ComfyUI's own
        validation then says what is wrong with it. A prompt of no kind of job is not touched."""
        try:
            return self._rewrite(json_data)
        except PlanRefused as exc:
            return refuse(json_data, str(exc))
        except Exception as exc:  # noqa: BLE001 - never raise inside ComfyUI's request
            prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
            if malformed(prompt) or not workflow.nodes_of(prompt, workflow.COLLECTOR):
                log.debug("[Distributed] prompt not planned", exc_info=True)
                return json_data
            log.error("[Distributed] a prompt could not be planned", exc_info=True)
            return refuse(json_data, f"the Multi-GPU Collector's job could not be planned "
                                     f"({type(exc).__name__}: {exc}); nothing was queued")

    def _rewrite(self, json_data: Any) -> Any:
        if not isinstance(json_data, dict):
            return json_data
        try:
            self.fleet.begin()  # normally started with the server already
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
        targets = json_data.get("partial_execution_targets")
        targets = targets if self.partial_execution and isinstance(targets, list) else None
        if not malformed(json_data.get("prompt")) and self._gives_values(json_data["prompt"]):
            config = self.fleet.config()
            extra = json_data.get("extra_data")
            pnginfo = extra.get("extra_pnginfo") if isinstance(extra, dict) else None
            graph = pnginfo.get("workflow") if isinstance(pnginfo, dict) else None
            try:
                json_data["prompt"] = values.resolve(values.titled(json_data["prompt"], graph), self.input_spec,
                                                     [plan.MASTER_ID] + [w.id for w in config.workers], plan.MASTER_ID)
            except values.Refused as exc:
                return refuse(json_data, str(exc))
        if not malformed(json_data.get("prompt")):
            for job_kind in self.kinds:
                json_data = job_kind.rewrite(json_data, json_data["prompt"], targets, submitted.get())
        sealed = spread.seal(json_data.get("prompt"), self.vault.keep)  # a sender prompt, on a worker
        if sealed is not json_data.get("prompt"):
            json_data["prompt"] = sealed
        return json_data

    def _gives_values(self, prompt: Any) -> bool:
        """A prompt submitted here whose Distributed Values this instance gives: not a spread
        prompt that a master sent it (those carry the master's values already)."""
        return (self.input_spec is not None and bool(workflow.nodes_of(prompt, values.VALUE))
                and not workflow.nodes_of(prompt, spread.SENDER))

    def submission(self) -> "Submission":
        return Submission(self)

    # --- the panel ------------------------------------------------------------------------------------
    def jobs(self) -> dict:
        """Running jobs of every kind, and the Collector jobs that ended lately."""
        return {"jobs": [job.summary() for job in self.collectors.store.active()]
                + [job.summary() for job in self.upscales.board.active()],
                "recent": self.collectors.store.recent()}

    async def interrupt_all(self, reason: str) -> None:
        """The panel's interrupt: every Collector job ends, every spread prompt is taken back."""
        for job in self.collectors.store.active():
            self.collectors.end(job.id, JobState.CANCELLED, reason)
        if self.spread is not None:
            await self.spread.withdraw_all(reason)

    async def close(self) -> None:
        await self.fleet.close()


class Submission:
    """One POST /prompt, as the middleware handles it: ``with runtime.submission() as s``, the
    handler inside; after the block, ``s.accepted(prompt_id)``, or ``s.abandoned(reason)`` where
    ComfyUI did not queue it. The jobs planned start only once the master has accepted the prompt, so that a
    prompt it rejects leaves nothing running on the workers; each credential sealed in it is good
    for that one prompt."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.planned: list = []
        self.reasons: list[str] = []
        self.keys: list[str] = []

    def __enter__(self) -> "Submission":
        self._tokens = submitted.set(self.planned), refused.set(self.reasons)
        self._minting = self.runtime.vault.collecting()
        return self

    def __exit__(self, *_exc) -> None:
        submitted.reset(self._tokens[0])
        refused.reset(self._tokens[1])
        self.keys = self.runtime.vault.collected(self._minting)  # credentials sealed in this prompt

    @property
    def refusal(self) -> str:
        return self.reasons[0] if self.reasons else ""

    def accepted(self, prompt_id: str) -> None:
        if not prompt_id:
            self.abandoned("the master rejected the prompt")
            return
        self.runtime.vault.bind(self.keys, prompt_id)
        for job_kind, job_id in self.planned:
            self.runtime.fleet.spawn(job_kind.start(job_id, prompt_id))

    def abandoned(self, reason: str) -> None:
        self.runtime.vault.discard(self.keys)
        for job_kind, job_id in self.planned:
            job_kind.drop(job_id, reason)
        self.planned.clear()


def refuse(json_data: dict, message: str) -> dict:
    """Keep a prompt out of ComfyUI's queue: without its prompt ComfyUI answers 400, and our
    middleware puts ``message`` in that answer."""
    log.warning("[Distributed] prompt refused: %s", message)
    json_data.pop("prompt", None)
    pending = refused.get()
    if pending is not None:
        pending.append(message)
    return json_data


def malformed(prompt: Any) -> bool:
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
