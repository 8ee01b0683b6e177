"""The relay (distributed_core/relay.py) over real websockets on loopback: a worker's side (Relays
behind the extension's relay route, as distributed_routes serves it) and a master's side (carry
through InstanceClient.relay), with this test's thread as the worker's ComfyUI execution thread.
The same path runs between real ComfyUI servers in every end-to-end job test."""
from __future__ import annotations

import asyncio
import threading
import time

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from distributed_core import relay, wire
from distributed_core.client import InstanceClient, InstanceError, Interrupted, deliver
from harness import free_port

TOKEN = "t" * 43


class World:
    """A worker's relay route and a master that carries its relays, on one loop in a thread."""

    def __init__(self, held: set[str] | None = None):
        self.held = held if held is not None else set()
        self.relays = relay.Relays(self.held.__contains__)
        self.port = free_port()
        self.answers: list[tuple[str, dict, bytes]] = []
        self.status = [200]  # the master's answers, in turn (the last one repeats)
        self.loop = asyncio.new_event_loop()
        self.sockets: list[web.WebSocketResponse] = []
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        started.wait(10)

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def route(request: web.Request) -> web.StreamResponse:  # as distributed_routes serves it
            token = request.headers.get(relay.SHARE_HEADER, "")
            if not self.relays.wanted(token):
                return web.json_response({"error": "no prompt holds that credential"}, status=403)
            ws = web.WebSocketResponse(max_msg_size=relay.MAX_MESSAGE, compress=False)
            await ws.prepare(request)
            self.sockets.append(ws)
            await self.relays.attach(token, ws)
            return ws

        async def start() -> None:
            app = web.Application()
            app.router.add_get(relay.PATH, route)
            self.runner = web.AppRunner(app)
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
            self.session = aiohttp.ClientSession()
            self.relays.loop = self.loop
            started.set()
        self.loop.run_until_complete(start())
        self.loop.run_forever()

    async def answer(self, path: str, headers: dict, body, length: int) -> relay.Reply:
        data = await body.readexactly(length) if length else b""
        self.answers.append((path, headers, data))
        status = self.status.pop(0) if len(self.status) > 1 else self.status[0]
        return relay.Reply.of_json({"got": len(data), "path": path}, status)

    def carry(self, token: str = TOKEN) -> tuple[asyncio.Event, "asyncio.Future"]:
        """The master opens the token's relay and answers over it until the event is set."""
        async def begin():
            stop = asyncio.Event()
            client = InstanceClient(self.session, f"http://127.0.0.1:{self.port}")
            return stop, asyncio.ensure_future(relay.carry(lambda: client.relay(token), self.answer, stop, "w1"))
        return asyncio.run_coroutine_threadsafe(begin(), self.loop).result(5)

    def on_loop(self, coro, timeout: float = 10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def end():
            await self.session.close()
            await self.runner.cleanup()
        self.on_loop(end())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def world():
    w = World({TOKEN})
    yield w
    w.close()


def stop_carrying(w: World, stop: asyncio.Event, carrying) -> None:
    async def end():
        stop.set()
        await asyncio.wait_for(asyncio.shield(carrying), 10)
    w.on_loop(end())


def test_a_request_sent_before_the_master_opens_the_relay_is_answered_once_it_does(world):
    body = np.arange(3 << 20, dtype=np.uint8) * 7  # three megabytes: several messages each way
    answered = {}
    thread = threading.Thread(target=lambda: answered.update(reply=world.relays.request(
        TOKEN, "/distributed/result", [body[:5], memoryview(body)[5:]], {"X-A": "b"}, time.monotonic() + 20)))
    thread.start()
    time.sleep(0.5)  # the prompt runs before its master connects (a worker with an empty queue)
    stop, carrying = world.carry()
    thread.join(20)
    reply = answered["reply"]
    assert reply.status == 200 and reply.json() == {"got": len(body), "path": "/distributed/result"}
    path, headers, data = world.answers[0]
    assert headers == {"X-A": "b"} and data == body.tobytes()
    # the next request of the same prompt goes over the same socket
    assert world.relays.request(TOKEN, "/distributed/tiles/lease", [b"{}"], None, time.monotonic() + 5).status == 200
    assert len(world.sockets) == 1
    stop_carrying(world, stop, carrying)
    assert carrying.exception() is None


def test_the_master_may_open_the_relay_while_the_prompt_waits_in_the_queue(world):
    stop, carrying = world.carry()  # the vault holds the token: the worker accepts the socket
    deadline = time.monotonic() + 5
    while not world.sockets and time.monotonic() < deadline:
        time.sleep(0.05)
    assert world.sockets, "the worker did not accept the relay of a prompt it holds"
    world.held.clear()  # the prompt took its token from the vault when it started
    assert world.relays.request(TOKEN, "/distributed/result", [b"x" * 10], None, time.monotonic() + 5).json()["got"] == 10
    stop_carrying(world, stop, carrying)


def test_a_credential_the_worker_does_not_hold_opens_no_relay(world):
    stop, carrying = world.carry("u" * 43)
    with pytest.raises(relay.RelayFailed, match="refused the prompt's credential"):
        world.on_loop(asyncio.wait_for(asyncio.shield(carrying), 10), timeout=15)
    assert world.sockets == []


def test_a_relay_that_breaks_mid_request_is_opened_again_and_the_request_sent_again(world):
    stop, carrying = world.carry()
    world.held.clear()
    world.relays.request(TOKEN, "/distributed/result", [b"first"], None, time.monotonic() + 5)
    world.on_loop(world.sockets[0].close())  # the connection drops (a proxy restarts)
    reply = world.relays.request(TOKEN, "/distributed/result", [b"second"], None, time.monotonic() + 15)
    assert reply.json()["got"] == 6 and len(world.sockets) == 2
    assert [a[2] for a in world.answers][-1] == b"second"
    stop_carrying(world, stop, carrying)


def test_waiting_for_the_master_ends_at_the_deadline_or_an_interrupt(world):
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="pass websockets"):
        world.relays.request(TOKEN, "/distributed/result", [b"x"], None, time.monotonic() + 0.5)
    assert time.monotonic() - started < 5
    asked = []
    with pytest.raises(relay.Interrupted):
        world.relays.request(TOKEN, "/distributed/result", [b"x"], None, time.monotonic() + 3600,
                             lambda: asked.append(1) or len(asked) > 3)


def test_delivery_retries_while_the_master_says_later_and_stops_at_a_refusal(world):
    stop, carrying = world.carry()
    send = lambda *a: world.relays.request(TOKEN, *a)  # noqa: E731 - as nodes.py binds it
    parts = wire.frame("j", "3", 1, 1, "t", np.zeros((1, 2, 2, 3), np.float32), "float32")
    world.status[:] = [503, 503, 200]
    deliver(send, "/distributed/result", parts, time.monotonic() + 30)
    assert len(world.answers) == 3
    world.status[:] = [409]
    with pytest.raises(InstanceError, match="answered /distributed/result with 409"):
        deliver(send, "/distributed/result", parts, time.monotonic() + 30)
    world.status[:] = [503]
    with pytest.raises(InstanceError, match="kept answering so"):
        deliver(send, "/distributed/result", parts, time.monotonic() + 0.5)
    with pytest.raises(Interrupted):
        deliver(send, "/distributed/result", parts, time.monotonic() + 30, interrupted=lambda: True)
    stop_carrying(world, stop, carrying)


async def serving(app: web.Application) -> tuple[web.AppRunner, int]:
    """``app`` on a free loopback port: (its runner, the port)."""
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


def test_an_instance_without_the_relay_is_named_as_older():
    async def go():
        runner, port = await serving(web.Application())
        async with aiohttp.ClientSession() as session:
            client = InstanceClient(session, f"http://127.0.0.1:{port}")
            try:
                with pytest.raises(relay.RelayFailed, match="older than the master's"):
                    await client.relay(TOKEN)
                version, why = await client.relay_probe()
                assert version is None and "older" in why
                client = InstanceClient(session, f"http://127.0.0.1:{free_port()}")
                with pytest.raises(InstanceError, match="cannot connect"):
                    await client.relay(TOKEN)
            finally:
                await runner.cleanup()
    asyncio.run(go())


def test_a_token_stays_wanted_from_its_prompt_queued_to_its_prompt_done():
    """The master may open a prompt's relay at any moment: while the prompt waits in the queue (the
    vault holds its token), once it took the token and renders, and while it sends."""
    from distributed_core.vault import Vault
    vault = Vault()
    relays = relay.Relays(vault.holds)
    vault.on_take = relays.expect
    key = vault.keep("token-1")
    vault.bind([key], "p1")
    assert relays.wanted("token-1") and not relays.wanted("token-2") and not relays.wanted("")
    assert vault.take(key, "p1") == "token-1"
    assert not vault.holds("token-1") and relays.wanted("token-1")


def test_a_server_error_on_opening_is_tried_again_and_a_plain_answer_names_the_proxy():
    """A 5xx (a worker or proxy failing for now) is retried by carry; a 2xx or 400 without the
    websocket upgrade is a proxy that does not pass websockets: named at once."""
    async def go():
        answers = {"status": 503}

        async def route(request):
            return web.Response(status=answers["status"], text="busy")
        app = web.Application()
        app.router.add_get(relay.PATH, route)
        runner, port = await serving(app)
        async with aiohttp.ClientSession() as session:
            client = InstanceClient(session, f"http://127.0.0.1:{port}")
            try:
                with pytest.raises(InstanceError, match="answered 503"):
                    await client.relay(TOKEN)
                answers["status"] = 200
                with pytest.raises(relay.RelayFailed, match="pass websockets"):
                    await client.relay(TOKEN)
            finally:
                await runner.cleanup()
    asyncio.run(go())
