"""What a master answers over a relay (distributed_core/inbox.py): bad, forged, late and junk frames
on every path, read through the relay's own body reader (relay.SocketBody), for a master runtime
over fake workers (fleet_fakes.Harness). Real servers exchange real frames over real relays in
every end-to-end job test."""
from __future__ import annotations

import json

import aiohttp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from distributed_core import wire
from distributed_core.relay import CHUNK, SocketBody
from fleet_fakes import Harness, config_with, run
from test_fuzz import raw_bodies

LONE_SURROGATE = "\ud800abc"  # JSON can spell it ("\\ud800abc"); UTF-8 cannot encode it


def _frame_with(header: dict, payload: bytes, magic: bytes = wire.MAGIC) -> bytes:
    data = json.dumps(header).encode("ascii")  # the surrogate travels as a JSON escape
    return magic + len(data).to_bytes(4, "big") + data + payload


PATHS = ["/distributed/result", "/distributed/spread/result", "/distributed/tiles/image",
         "/distributed/tiles/lease", "/distributed/tiles/result"]


def body_of(data: bytes) -> SocketBody:
    """``data`` as it arrives over a relay: binary messages of at most a megabyte."""
    messages = [aiohttp.WSMessage(aiohttp.WSMsgType.BINARY, data[i:i + CHUNK], None)
                for i in range(0, len(data), CHUNK)]

    async def receive():
        return messages.pop(0) if messages else aiohttp.WSMessage(aiohttp.WSMsgType.CLOSED, None, None)
    return SocketBody(receive, len(data))


async def ask(h: Harness, path: str, data: bytes, headers: dict | None = None):
    body = body_of(data)
    reply = await h.runtime.inbox.answer(path, headers or {}, body, len(data))
    await body.drain()
    return reply


def _frame(job="nope", unit=1, token="t", shape=(1, 2, 2, 3)) -> bytes:
    header = wire.Header(job, "4", unit, token, "float32", shape)
    return b"".join(bytes(p) for p in wire.encode(header, np.zeros(shape, np.float32)))


@pytest.fixture
def h(tmp_path):
    return Harness(tmp_path, config_with(("w1", 18189, True), ("w2", 18190, True)))


@pytest.mark.parametrize("data, status, words", [
    (b"", 400, "truncated"),
    (b"GARBAGE!", 400, "magic"),
    (wire.MAGIC + (5).to_bytes(4, "big") + b"{bad}", 400, "not JSON"),
    (_frame(), 404, "no job"),
])
def test_bad_result_frames_are_refused(h, data, status, words):
    reply = run(ask(h, "/distributed/result", data))
    assert reply.status == status, reply.text
    assert words in reply.json()["error"]


def test_a_frame_with_a_wrong_token_short_body_or_after_the_end_is_refused(h):
    async def go():
        job_id = await h.started()
        share = next(s for s in h.jobs.store.get(job_id).shares.values() if s.participant == "w1")
        unit = share.units[0]
        assert (await ask(h, "/distributed/result", _frame(job_id, unit, "wrong", (1, 8, 8, 3)))).status == 403
        frame = _frame(job_id, unit, share.token, (1, 8, 8, 3))
        body = body_of(frame[:-10])  # the relay promises fewer bytes than the header does
        assert (await h.runtime.inbox.answer("/distributed/result", {}, body, len(frame))).status == 400
        reply = await ask(h, "/distributed/result", frame)
        assert reply.status == 200 and reply.json()["unit"] == unit
        assert not h.jobs.store.get(job_id).missing_units([unit])
        h.jobs.drop(job_id, "test over")
        assert (await ask(h, "/distributed/result", frame)).status in (404, 410)
    run(go())


def test_an_unknown_path_is_named(h):
    reply = run(ask(h, "/distributed/elsewhere", b""))
    assert reply.status == 404 and "different version" in reply.json()["error"]


def test_a_lone_surrogate_in_any_frame_or_token_is_refused_with_4xx(h):
    """Frames whose header strings hold a lone surrogate, for a job that runs now (so that the
    token is compared, which encoded it and answered 500 once), on every path that reads a frame or
    a token."""
    async def go():
        job_id = await h.started()
        good = {"job": job_id, "collector": "4", "unit": 1, "count": 1, "token": "t" * 32, "dtype": "float32",
                "shape": [1, 8, 8, 3], "encoding": "raw", "nbytes": 0}
        pixels = bytes(8 * 8 * 3 * 4)
        answers = {}
        for key in ("token", "job", "collector"):
            data = _frame_with({**good, key: LONE_SURROGATE}, pixels)
            for path in ("/distributed/result", "/distributed/tiles/result"):
                answers[(path, key)] = await ask(h, path, data)
            value = {"prompt": "p", "token": "t" * 32, "tree": None, "arrays": [], key: LONE_SURROGATE}
            answers[("/distributed/spread/result", key)] = await ask(
                h, "/distributed/spread/result", _frame_with(value, b"", wire.VALUE_MAGIC))
            ident = {"job": job_id, "node": "4", "token": "t" * 32, key: LONE_SURROGATE}
            for path in ("/distributed/tiles/image", "/distributed/tiles/lease"):
                answers[(path, key)] = await ask(h, path, json.dumps(ident).encode())
        wrong = {where: f"{r.status} {r.text[:200]}" for where, r in answers.items() if not 400 <= r.status < 500}
        assert not wrong, wrong
        for key in ("token", "job", "collector"):
            assert "surrogate" in answers[("/distributed/result", key)].json()["error"]
        assert h.jobs.store.get(job_id).missing_units([1, 2])  # nothing arrived
    run(go())


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=raw_bodies())
def test_junk_on_every_path_gets_a_4xx_answer(tmp_path_factory, data):
    h = Harness(tmp_path_factory.mktemp("inbox"), config_with(("w1", 18189, True)))

    async def go():
        await h.started()
        for path in PATHS:
            reply = await ask(h, path, data, {"X-Distributed-Notice": "x"})
            assert 400 <= reply.status < 500, (path, reply.status, reply.text)
    run(go())


def test_each_workers_token_delivers_only_its_own_units(h):
    """Workers of one job each have their own token: w2's does not deliver w1's units."""
    async def go():
        job_id = await h.started()
        shares = {s.participant: s for s in h.jobs.store.get(job_id).shares.values()}
        unit = shares["w1"].units[0]
        reply = await ask(h, "/distributed/result", _frame(job_id, unit, shares["w2"].token, (1, 8, 8, 3)))
        assert reply.status == 400 and "w2 was given units" in reply.json()["error"]
        assert h.jobs.store.get(job_id).missing_units([unit])
    run(go())
