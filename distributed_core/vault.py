"""Credentials of the prompts that a master sent to this instance as a worker, held in memory only.

A worker-role prompt (a Collector's share, a tile worker, a spread sender) carries the token that
lets it deliver into one job of its master. ComfyUI shows every queued prompt to anyone who asks
(GET /queue, GET /history), so the prompt hook moves each token out of the prompt into this vault
(``seal``, ``keep``) and leaves a random key in its place.

A key alone is not enough: it is bound to the one prompt ComfyUI queued it in, by that prompt's
id, once POST /prompt has answered (``collecting`` and ``bind``, driven by the glue's middleware).
Whoever reads the key from the queue and queues a copy of the prompt (with other inputs, or
another master address) gets a prompt id of its own, and its copy takes nothing: it can neither
deliver into the job nor learn the token. The prompt the master sent takes its token once.
"""
from __future__ import annotations

import contextvars
import secrets
import threading
from dataclasses import dataclass
from typing import Any, Callable

from .workflow import COLLECTOR, UPSCALE, Prompt, nodes_of, read_field, with_fields

BIND_SECONDS = 5.0  # a prompt may start before POST /prompt has answered: its key waits this long

# keys minted during the POST /prompt being handled (the middleware binds them to its answer)
_minted: contextvars.ContextVar[list | None] = contextvars.ContextVar("distributed_minted", default=None)


class Refused(LookupError):
    """A key that this prompt may not use, with why."""


@dataclass
class _Entry:
    token: str
    prompt_id: str | None = None  # None until POST /prompt has answered with the prompt's id


class Vault:
    def __init__(self, limit: int = 4096, on_take: Callable[[str], None] = lambda _token: None):
        self.limit = limit
        self.on_take = on_take  # told each token as a prompt takes it (relay.Relays.expect)
        self._entries: dict[str, _Entry] = {}
        self._changed = threading.Condition()

    # --- in the prompt hook, inside POST /prompt ---------------------------------------------------
    def keep(self, token: str) -> str:
        """Hold one token; returns the key that stands for it in the prompt."""
        key = secrets.token_urlsafe(16)
        with self._changed:
            self._entries[key] = _Entry(token)
            while len(self._entries) > self.limit:  # a prompt deleted before it ran leaves its key
                self._entries.pop(next(iter(self._entries)))
        minted = _minted.get()
        if minted is not None:
            minted.append(key)
        return key

    def seal(self, prompt: Prompt) -> Prompt:
        """A worker-role prompt with each Collector's and tiled upscale's token moved in here."""
        result = prompt
        for nid in nodes_of(prompt, COLLECTOR) + nodes_of(prompt, UPSCALE):
            field = read_field(prompt, nid)
            if not field or field.get("role") != "worker" or not isinstance(field.get("token"), str):
                continue
            token = field.pop("token")
            result = with_fields(result, [nid], {**field, "sealed": self.keep(token)})
        return result

    # --- around POST /prompt (the glue's middleware) -----------------------------------------------
    @staticmethod
    def collecting() -> contextvars.Token:
        """Start noting the keys minted while this request is handled."""
        return _minted.set([])

    @staticmethod
    def collected(started: contextvars.Token) -> list[str]:
        keys = _minted.get() or []
        _minted.reset(started)
        return keys

    def bind(self, keys: list[str], prompt_id: str) -> None:
        """The keys belong to the prompt ComfyUI queued under ``prompt_id``."""
        with self._changed:
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None:
                    entry.prompt_id = prompt_id
            self._changed.notify_all()

    def discard(self, keys: list[str]) -> None:
        """ComfyUI did not queue the prompt: its keys are void."""
        with self._changed:
            for key in keys:
                self._entries.pop(key, None)
            self._changed.notify_all()

    def holds(self, token: str) -> bool:
        """Whether a prompt queued here carries ``token`` and has not used it yet: its master may
        open that prompt's relay (relay.py) before the prompt runs."""
        with self._changed:
            return any(entry.token == token for entry in self._entries.values())

    # --- when the prompt runs (ComfyUI's execution thread) -----------------------------------------
    def take(self, key: Any, prompt_id: str | None, wait: float = BIND_SECONDS) -> str:
        """The token for ``key``, once, for the prompt ``prompt_id`` that runs now (None where this
        ComfyUI does not tell: the key alone then counts). Raises Refused with the reason."""
        if not isinstance(key, str):
            raise Refused("it carries no key")
        with self._changed:
            self._changed.wait_for(lambda: key not in self._entries or self._entries[key].prompt_id is not None,
                                   timeout=wait)
            entry = self._entries.get(key)
            if entry is None:
                raise Refused("its key is unknown here: it was used already, or this instance restarted since")
            if entry.prompt_id is None:
                raise Refused("its key was never bound to a queued prompt")
            if prompt_id is not None and entry.prompt_id != prompt_id:
                raise Refused(f"its key belongs to prompt {entry.prompt_id}, not to this one ({prompt_id}): "
                              "this is a copy of a prompt that the master sent")
            self.on_take(entry.token)  # before it leaves: its relay is wanted all along
            del self._entries[key]
            return entry.token
