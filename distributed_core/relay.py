"""The relay: how a worker's prompt hands its work back to the master without ever connecting to it.

For every prompt it sends a worker (a Collector share, a tile worker, a spread prompt) the master
opens a websocket to that worker, ``GET /distributed/relay`` with the prompt's share token in the
``X-Distributed-Share`` header, and keeps it open while it watches the prompt (``carry``). What
the prompt has for the master (result frames, tile leases, tile results, spread values) goes over
that socket as requests, and the master answers each one as an HTTP server would: ``answer(path,
headers, body, length)`` gives a Reply. So a worker that the master can reach takes full part even
where it cannot reach the master (Docker networks, NAT, a one-way tunnel, a cloud pod behind its
https proxy), and results still stream as they are made.

Only the share token opens a relay, and the worker's vault holds it out of sight of anyone who reads
the worker's queue (vault.py): whoever reads the queue can neither fetch a share's results nor
deliver in its name.

On the socket, one request at a time, each way a text message then the body in binary messages:
  worker -> master  {"path": "/distributed/result", "headers": {...}, "length": n}, n bytes
  master -> worker  {"status": 200, "headers": {...}, "length": n}, n bytes
  master -> worker  {"keepalive": true} while idle, so that proxies keep the socket open.
A socket that breaks mid-request is opened again by the master and the request sent again.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable

import aiohttp

log = logging.getLogger("comfyui-distributed")

PATH = "/distributed/relay"
SHARE_HEADER = "X-Distributed-Share"
PROBE = "probe"            # ?probe=1 without a token: the doctor's check that websockets get through
CHUNK = 4 << 20            # bytes per binary message
MAX_MESSAGE = 16 << 20     # what either side accepts in one message
KEEPALIVE_SECONDS = 20.0   # an idle socket says so this often (proxies close silent ones)
PATIENCE_SECONDS = 30.0    # the master keeps trying to open a relay this long before it gives up
MAX_HEAD = 64 << 10        # a request's or reply's text message


class RelayFailed(Exception):
    """The master could not keep a relay open to a worker's prompt; the message says why and what
    to do."""


class Gone(Exception):
    """The socket closed under a request (the worker side sends the request again)."""


@dataclass
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    parts: list = field(default_factory=list)  # bytes-like pieces of the body

    @classmethod
    def of_json(cls, value: Any, status: int = 200) -> "Reply":
        return cls(status, {"Content-Type": "application/json"}, [json.dumps(value).encode()])

    @property
    def body(self) -> bytes:
        return b"".join(bytes(p) for p in self.parts)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body or b"null")


Answer = Callable[[str, dict, Any, int], Awaitable[Reply]]


def _head(message: aiohttp.WSMessage) -> dict:
    if message.type != aiohttp.WSMsgType.TEXT or len(message.data) > MAX_HEAD:
        raise Gone(f"the relay sent {message.type.name} where a request or reply was due")
    try:
        head = json.loads(message.data)
    except ValueError:
        raise Gone("the relay sent a text message that is not JSON") from None
    if not isinstance(head, dict):
        raise Gone("the relay sent a text message that is not a JSON object")
    return head


def _length(head: dict) -> int:
    length = head.get("length")
    if not isinstance(length, int) or isinstance(length, bool) or length < 0:
        raise Gone("the relay sent a request or reply without a length")
    return length


def _headers(head: dict) -> dict[str, str]:
    headers = head.get("headers") or {}
    if not isinstance(headers, dict):
        raise Gone("the relay sent headers that are not an object")
    return {str(k): str(v) for k, v in headers.items()}


def pieces(parts: Iterable, interrupted: Callable[[], bool] = lambda: False):
    """The buffers of a body, CHUNK bytes at most each, without copying (wire.LazyPixels makes its
    own as it goes)."""
    for part in parts:
        if hasattr(part, "chunks"):
            chunks = part.chunks()
        else:
            view = memoryview(part).cast("B")
            chunks = (view[i:i + CHUNK] for i in range(0, len(view), CHUNK))
        for chunk in chunks:
            if interrupted():
                raise Interrupted()
            yield chunk if isinstance(chunk, (bytes, bytearray, memoryview)) else memoryview(chunk)


class Interrupted(Exception):
    """The prompt was interrupted while it talked to the master."""


async def _send(ws, head: dict, parts: Iterable) -> None:
    parts = list(parts)
    await ws.send_str(json.dumps({**head, "length": sum(len(p) for p in parts)}))
    for chunk in pieces(parts):
        if len(chunk):
            await ws.send_bytes(chunk)


# --- the master's side -----------------------------------------------------------------------------

class SocketBody:
    """A request's body as it arrives over the relay, read like an aiohttp request's content
    (``read``, ``readexactly``) by the same code that reads HTTP bodies."""

    def __init__(self, receive: Callable[[], Awaitable[aiohttp.WSMessage]], length: int):
        self._receive = receive
        self.left = length       # bytes not yet taken off the socket
        self._buffer = memoryview(b"")  # what arrived and was not read yet (never copied when read)

    async def _fill(self) -> bool:
        if self.left == 0:
            return False
        message = await self._receive()
        if message.type != aiohttp.WSMsgType.BINARY:
            raise Gone("the relay closed inside a request")
        data = memoryview(message.data)[:self.left]
        self.left -= len(data)
        self._buffer = memoryview(bytes(self._buffer) + bytes(data)) if len(self._buffer) else data
        return True

    async def read(self, n: int = -1):
        """Up to ``n`` bytes (a memoryview), b"" at the end."""
        if not len(self._buffer) and not await self._fill():
            return b""
        n = len(self._buffer) if n < 0 else n
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    async def readexactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            if not await self._fill():
                partial, self._buffer = bytes(self._buffer), memoryview(b"")
                raise asyncio.IncompleteReadError(partial, n)
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return bytes(data)

    async def drain(self) -> None:
        """Take what the answer left unread off the socket, so that the next request starts clean."""
        self._buffer = memoryview(b"")
        while await self._fill():
            self._buffer = memoryview(b"")


async def carry(open_socket: Callable[[], Awaitable[Any]], answer: Answer, stop: asyncio.Event,
                label: str) -> None:
    """Keep a relay open to one worker prompt and answer its requests, until ``stop`` is set.
    ``open_socket()`` opens the websocket (InstanceClient.relay). Raises RelayFailed when the
    worker refuses it, or it cannot be opened for PATIENCE_SECONDS."""
    failing_since: float | None = None
    delay = 0.25
    while not stop.is_set():
        try:
            ws = await open_socket()
        except RelayFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to connect is retried for a while
            now = time.monotonic()
            failing_since = failing_since or now
            if now - failing_since > PATIENCE_SECONDS:
                raise RelayFailed(f"the master could not open its relay to {label} for {PATIENCE_SECONDS:g} s "
                                  f"({exc})") from None
            await _until(stop, delay)
            delay = min(delay * 2, 2.0)
            continue
        failing_since, delay = None, 0.25
        try:
            await _serve(ws, answer, stop)
        except Gone as exc:
            log.info("[Distributed] relay to %s broke (%s); opening it again", label, exc)
        except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError) as exc:
            log.info("[Distributed] relay to %s broke (%s); opening it again", label, type(exc).__name__)
        finally:
            await ws.close()


async def _until(event: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except asyncio.TimeoutError:
        pass


async def _serve(ws, answer: Answer, stop: asyncio.Event) -> None:
    stopping = asyncio.ensure_future(stop.wait())
    try:
        while True:
            receiving = asyncio.ensure_future(ws.receive())
            while True:
                done, _ = await asyncio.wait({receiving, stopping}, timeout=KEEPALIVE_SECONDS,
                                             return_when=asyncio.FIRST_COMPLETED)
                if done:
                    break
                await ws.send_str('{"keepalive": true}')
            if receiving not in done:  # stopped while idle: the prompt is over
                receiving.cancel()
                return
            message = receiving.result()
            if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                                aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                raise Gone("the worker closed it")
            head = _head(message)
            path, length = head.get("path"), _length(head)
            body = SocketBody(ws.receive, length)
            try:
                reply = await answer(str(path), _headers(head), body, length)
            except Gone:
                raise
            except Exception as exc:  # noqa: BLE001 - the worker gets an answer, the log the details
                log.error("[Distributed] answering %s over a relay failed", path, exc_info=exc)
                reply = Reply.of_json({"error": f"the master failed to answer {path}: {exc}"}, 500)
            await body.drain()
            await _send(ws, {"status": reply.status, "headers": reply.headers}, reply.parts)
    finally:
        stopping.cancel()


# --- the worker's side -----------------------------------------------------------------------------

class _Channel:
    """The relay of one share token on a worker: the master's socket while it is open, and the
    messages it sent that a request has not read yet."""

    def __init__(self):
        self.ws = None
        self.messages: asyncio.Queue = asyncio.Queue()
        self.connected = asyncio.Event()
        self.lock = threading.Lock()  # one request at a time (ComfyUI runs one prompt at a time)


class Relays:
    """The relays that masters opened to this instance, by share token. ``holds(token)`` says
    whether this instance holds a token that a prompt queued here has yet to use (vault.Vault)."""

    def __init__(self, holds: Callable[[str], bool], limit: int = 256):
        self.holds = holds
        self.limit = limit
        self.loop: asyncio.AbstractEventLoop | None = None
        self._channels: "OrderedDict[str, _Channel]" = OrderedDict()
        self._taken: "OrderedDict[str, None]" = OrderedDict()  # tokens that prompts took, newest last
        self._taken_lock = threading.Lock()

    def expect(self, token: str) -> None:
        """A prompt that runs here took ``token`` (vault.Vault.take, on the execution thread): its
        master may open the relay from now on too, before the prompt sends anything."""
        with self._taken_lock:
            self._taken[token] = None
            while len(self._taken) > 4 * self.limit:
                self._taken.popitem(last=False)

    def wanted(self, token: str) -> bool:
        if not token:
            return False
        with self._taken_lock:
            taken = token in self._taken
        return taken or token in self._channels or self.holds(token)

    def _channel(self, token: str) -> _Channel:
        channel = self._channels.get(token)
        if channel is None:
            channel = self._channels[token] = _Channel()
            for old in list(self._channels)[:-self.limit]:  # keep the newest; drop idle old ones
                if self._channels[old].ws is None:
                    del self._channels[old]
        self._channels.move_to_end(token)
        return channel

    async def attach(self, token: str, ws) -> None:
        """On the loop, for the websocket the master just opened: it serves the token's requests
        until it closes (a newer one for the same token replaces it)."""
        self.loop = asyncio.get_running_loop()
        channel = self._channel(token)
        if channel.ws is not None:
            await channel.ws.close()
        channel.ws, channel.messages = ws, asyncio.Queue()
        channel.connected.set()
        messages = channel.messages
        try:
            async for message in ws:
                if message.type == aiohttp.WSMsgType.TEXT and message.data == '{"keepalive": true}':
                    continue
                messages.put_nowait(message)
        finally:
            if channel.ws is ws:
                channel.ws = None
                channel.connected.clear()
            messages.put_nowait(None)  # wakes a request that waits for a reply

    # --- on ComfyUI's execution thread ----------------------------------------------------------
    def request(self, token: str, path: str, parts: list, headers: dict[str, str] | None = None,
                deadline: float | None = None, interrupted: Callable[[], bool] = lambda: False) -> Reply:
        """Send one request to the master over the token's relay and give its reply. Waits for the
        master to open the relay, and sends again when the socket breaks, until ``deadline``
        (time.monotonic()). Raises Interrupted, or TimeoutError with why."""
        if self.loop is None:
            raise RelayFailed("the extension's server loop has not started on this worker")
        deadline = deadline if deadline is not None else time.monotonic() + 120.0
        channel = self._on_loop(self._ready(token), deadline, interrupted)
        with channel.lock:
            ws = None
            while True:
                ws = self._on_loop(self._wait_connected(channel, ws), deadline, interrupted)
                try:
                    return self._exchange(channel, ws, path, parts, headers or {}, deadline, interrupted)
                except Gone:
                    if time.monotonic() >= deadline:
                        raise TimeoutError("the master's relay to this worker broke and was not opened "
                                           "again before the job's timeout") from None
                except BaseException:  # interrupted mid-request: the master opens the relay afresh
                    self._on_loop(ws.close(), time.monotonic() + 5)
                    raise

    def _exchange(self, channel: _Channel, ws, path: str, parts: list, headers: dict, deadline: float,
                  interrupted: Callable[[], bool]) -> Reply:
        length = sum(len(p) for p in parts)
        call = lambda coro: self._on_loop(coro, deadline, interrupted)  # noqa: E731
        call(self._guarded(ws, ws.send_str(json.dumps({"path": path, "headers": headers, "length": length}))))
        sending = None  # the message before this one: made here while that one is sent
        for chunk in pieces(parts, interrupted):
            if len(chunk):
                after = asyncio.run_coroutine_threadsafe(self._guarded(ws, ws.send_bytes(chunk)), self.loop)
                if sending is not None:
                    self._wait(sending, deadline, interrupted)
                sending = after
        if sending is not None:
            self._wait(sending, deadline, interrupted)
        return call(self._reply(channel.messages))

    async def _ready(self, token: str) -> _Channel:
        return self._channel(token)

    @staticmethod
    async def _wait_connected(channel: _Channel, broken=None):
        """The master's socket for this token, once it is open (another than ``broken``)."""
        while channel.ws is None or channel.ws is broken:
            if channel.ws is broken and broken is not None and not broken.closed:
                await broken.close()
            channel.connected.clear()
            await channel.connected.wait()
        return channel.ws

    @staticmethod
    async def _guarded(ws, sending: Awaitable) -> None:
        if ws.closed:
            sending.close()
            raise Gone("the master's relay closed")
        try:
            await sending
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
            raise Gone(str(exc)) from None

    @staticmethod
    async def _reply(messages: asyncio.Queue) -> Reply:
        async def next_message():
            message = await messages.get()
            if message is None:
                raise Gone("the master's relay closed before it answered")
            return message
        head = _head(await next_message())
        status, length = head.get("status"), _length(head)
        if not isinstance(status, int):
            raise Gone("the master's reply has no status")
        body = SocketBody(next_message, length)
        return Reply(status, _headers(head), [await body.readexactly(length)] if length else [])

    def _on_loop(self, coro, deadline: float, interrupted: Callable[[], bool] = lambda: False):
        """Run ``coro`` on the server's loop and wait for it here, asking ``interrupted`` as it waits."""
        return self._wait(asyncio.run_coroutine_threadsafe(coro, self.loop), deadline, interrupted)

    @staticmethod
    def _wait(future: concurrent.futures.Future, deadline: float, interrupted: Callable[[], bool]):
        while True:
            if concurrent.futures.wait([future], timeout=0.05).done:
                return future.result()
            if interrupted():
                future.cancel()
                raise Interrupted()
            if time.monotonic() >= deadline:
                future.cancel()
                raise TimeoutError("the master did not open its relay to this worker before the job's timeout: "
                                   "it opens one (a websocket to /distributed/relay) for every prompt it sends "
                                   "here, so a proxy in front of this worker must pass websockets")
