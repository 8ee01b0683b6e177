"""Talking to ComfyUI instances over their public HTTP API, and a worker delivering its results to the master.

Every failure becomes an InstanceError whose message a user can act on.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import time
from typing import TYPE_CHECKING, Any, Callable

import aiohttp

from . import relay

if TYPE_CHECKING:
    import ssl

QUICK = aiohttp.ClientTimeout(total=3, sock_connect=2)     # status polls: a frozen worker is noticed fast
DISPATCH = aiohttp.ClientTimeout(total=10, sock_connect=3)  # a prompt can take a moment to validate
PROBE = aiohttp.ClientTimeout(total=4, sock_connect=2)     # the worker doctor: answers within seconds
SLOW_LINK_BYTES_PER_S = 128 * 1024  # input files move at least this fast (about 1 Mbit/s) before we give up
ANSWER_S = 60.0                     # an upload or download that goes silent this long has failed


def transfer_timeout(nbytes: int | None) -> aiohttp.ClientTimeout:
    """For moving a whole input file: a minute plus the time the file takes on a slow link (about
    1 Mbit/s), so a large file on a slow link gets through and a stalled one is given up."""
    size = max(0, nbytes or 0)
    return aiohttp.ClientTimeout(total=60.0 + size / SLOW_LINK_BYTES_PER_S, sock_connect=5, sock_read=ANSWER_S)


class InstanceError(RuntimeError):
    def __init__(self, message: str, refused: bool = False, status: int | None = None):
        super().__init__(message)
        self.refused = refused  # nothing listens there: the process is gone, not just slow
        self.status = status    # the HTTP status it answered with, when it answered


JOBS_API_RECHECK = 60.0  # seconds before asking again whether an instance has the jobs API


def describe(url: str, exc: BaseException) -> str:
    if isinstance(exc, InstanceError):
        return str(exc)
    if isinstance(exc, asyncio.TimeoutError):
        return f"{url} did not answer in time (frozen, overloaded, or a firewall dropping packets)"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"{url}: its https certificate was not accepted: {_certificate_reason(exc)}"
    if isinstance(exc, aiohttp.ClientSSLError):
        return (f"{url}: the https connection failed ({getattr(exc, 'os_error', None) or exc}); "
                "is it https at all there (http:// instead?), and does the proxy accept TLS?")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {url}: {_connect_reason(exc.os_error)}; is that ComfyUI instance running?"
    return f"{url}: {type(exc).__name__}: {exc}"


def _certificate_reason(exc: "aiohttp.ClientConnectorCertificateError") -> str:
    """Why a certificate was refused, in words, with what to do."""
    error = getattr(exc, "certificate_error", None)
    text = str(getattr(error, "verify_message", "") or error or exc).lower()
    if "hostname mismatch" in text or "ip address mismatch" in text or "doesn't match" in text:
        return ("it was issued for another host name than the one in the worker's url; use the name the "
                "certificate names, or a certificate for this name")
    if "expired" in text:
        return "it has expired; renew the certificate on the worker's proxy"
    if "not yet valid" in text:
        return "it is not valid yet (is a clock wrong?)"
    if "self-signed" in text or "self signed" in text or "unable to get local issuer" in text:
        return ("it is signed by a CA that this master does not know (self-signed?); give the CA file as "
                "the worker's ca_bundle")
    return f"{text or 'verification failed'}; check the certificate, or give its CA as the worker's ca_bundle"


def _connect_reason(error: OSError | None) -> str:
    """Why a connection failed, in words rather than as "[Errno 111] Connect call failed"."""
    import errno
    import socket
    if isinstance(error, socket.gaierror):
        return "its host name does not resolve"
    reasons = {errno.ECONNREFUSED: "nothing listens on that port",
               errno.EHOSTUNREACH: "that host cannot be reached (off, or another network)",
               errno.ENETUNREACH: "that network cannot be reached from here",
               errno.ETIMEDOUT: "the connection timed out (a firewall dropping packets?)",
               errno.ECONNRESET: "the connection was reset"}
    code = getattr(error, "errno", None)
    if code in reasons:
        return reasons[code]
    text = getattr(error, "strerror", None) or str(error or "the connection failed")
    if "Connect call failed" in text or "[Errno 111]" in text:  # several addresses tried, all refused
        return reasons[errno.ECONNREFUSED]
    return text[0].lower() + text[1:] if text else "the connection failed"


class InstanceClient:
    """One ComfyUI instance, seen through its HTTP API."""

    def __init__(self, session: aiohttp.ClientSession, url: str, features: dict | None = None,
                 tls: "ssl.SSLContext | None" = None, headers: dict[str, str] | None = None, problem: str = ""):
        self.session = session
        self.url = url.rstrip("/")
        self.tls = tls              # verifies an https worker's certificate (its CA file); None: the system's
        self.headers = dict(headers or {})  # sent with every request (a proxy's token); never in a message
        self.problem = problem      # why no request can be made (its CA file cannot be read)
        # what was learned of each instance's API, shared by the clients of one owner:
        # instance URL -> (it has the jobs API, time.monotonic() when that was asked)
        self.features = features if features is not None else {}

    def _extras(self, headers: dict[str, str] | None = None) -> dict:
        """What every request to this instance carries: its TLS check and its headers."""
        if self.problem:
            raise InstanceError(f"{self.url}: {self.problem}")
        extras: dict = {"headers": {**self.headers, **(headers or {})}} if self.headers or headers else {}
        if self.tls is not None:
            extras["ssl"] = self.tls
        return extras

    async def _request(self, method: str, path: str, timeout: aiohttp.ClientTimeout,
                       body: Any = None) -> Any:
        try:
            async with self.session.request(method, self.url + path, json=body, timeout=timeout,
                                            **self._extras()) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise InstanceError(f"{self.url}{path} answered {resp.status}: {_error_text(text)}",
                                        status=resp.status)
                try:
                    return json.loads(text) if text.strip() else None
                except ValueError:
                    raise InstanceError(f"{self.url}{path} did not answer with JSON (is it a ComfyUI?)",
                                        status=resp.status) from None
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise InstanceError(describe(self.url, exc),
                                refused=isinstance(exc, aiohttp.ClientConnectorError)) from exc

    async def post_prompt(self, prompt: dict, client_id: str) -> str:
        answer = await self._request("POST", "/prompt", DISPATCH, {"prompt": prompt, "client_id": client_id})
        if not isinstance(answer, dict) or "prompt_id" not in answer:
            raise InstanceError(f"{self.url}/prompt gave no prompt id")
        return str(answer["prompt_id"])

    async def history(self, prompt_id: str) -> dict | None:
        answer = await self._request("GET", f"/history/{prompt_id}", QUICK)
        return answer.get(prompt_id) if isinstance(answer, dict) else None

    async def queue(self) -> tuple[list[str], list[str]]:
        """Prompt ids running and pending."""
        answer = await self._request("GET", "/queue", QUICK) or {}
        return ([str(item[1]) for item in answer.get("queue_running", [])],
                [str(item[1]) for item in answer.get("queue_pending", [])])

    async def system_stats(self) -> dict:
        return await self._request("GET", "/system_stats", QUICK) or {}

    async def queue_remaining(self) -> int:
        answer = await self._request("GET", "/prompt", QUICK) or {}
        return int(answer.get("exec_info", {}).get("queue_remaining", 0))

    async def free(self) -> None:
        await self._request("POST", "/free", QUICK, {"unload_models": True, "free_memory": True})

    async def interrupt(self, prompt_id: str = "") -> None:
        """Stop what the instance runs; with ``prompt_id``, current ComfyUI stops only that prompt
        (and nothing when it is not the one running). ComfyUI of early 2024 ignores the body."""
        await self._request("POST", "/interrupt", QUICK, {"prompt_id": prompt_id} if prompt_id else {})

    async def delete_queued(self, prompt_ids: list[str]) -> None:
        await self._request("POST", "/queue", QUICK, {"delete": prompt_ids})

    async def input_size(self, name: str) -> int | None:
        """Size of a file in the instance's input folder, or None when it has none by that name."""
        subfolder, _, filename = name.rpartition("/")
        params = {"filename": filename, "subfolder": subfolder, "type": "input"}
        try:
            async with self.session.get(self.url + "/view", params=params, timeout=QUICK,
                                        **self._extras({"Range": "bytes=0-0"})) as resp:
                if resp.status == 404:
                    return None
                if resp.status not in (200, 206):
                    raise InstanceError(f"{self.url}/view answered {resp.status} for input {name}")
                total = resp.headers.get("Content-Range", "").rpartition("/")[2]
                return int(total) if total.isdigit() else resp.content_length
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise InstanceError(describe(self.url, exc)) from exc

    async def input_digest(self, name: str, size: int | None = None) -> str | None:
        """SHA-256 of a file in the instance's input folder (read through GET /view), or None when
        it has none by that name. ``size``: its expected size, which sets the timeout."""
        subfolder, _, filename = name.rpartition("/")
        params = {"filename": filename, "subfolder": subfolder, "type": "input"}
        digest = hashlib.sha256()
        try:
            async with self.session.get(self.url + "/view", params=params, timeout=transfer_timeout(size),
                                        **self._extras()) as resp:
                if resp.status == 404:
                    return None
                if resp.status != 200:
                    raise InstanceError(f"{self.url}/view answered {resp.status} for input {name}")
                async for chunk in resp.content.iter_chunked(1 << 20):
                    digest.update(chunk)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise InstanceError(describe(self.url, exc)) from exc
        return digest.hexdigest()

    async def upload_input(self, name: str, data: bytes) -> None:
        subfolder, _, filename = name.rpartition("/")
        form = aiohttp.FormData()
        form.add_field("image", data, filename=filename, content_type="application/octet-stream")
        form.add_field("subfolder", subfolder)
        form.add_field("type", "input")
        form.add_field("overwrite", "true")
        try:
            async with self.session.post(self.url + "/upload/image", data=form, **self._extras(),
                                         timeout=transfer_timeout(len(data))) as resp:
                if resp.status != 200:
                    raise InstanceError(f"{self.url} refused the upload of input {name}: "
                                        f"{resp.status} {_error_text(await resp.text())}")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise InstanceError(describe(self.url, exc)) from exc

    async def object_info(self, timeout: aiohttp.ClientTimeout = DISPATCH) -> dict:
        """Every node class the instance offers, with its inputs and their choices (models among them)."""
        answer = await self._request("GET", "/object_info", timeout)
        if not isinstance(answer, dict):
            raise InstanceError(f"{self.url}/object_info gave no node list")
        return answer

    async def relay(self, token: str):
        """Open the relay of one prompt sent to this worker (relay.py): a websocket to
        /distributed/relay holding the prompt's share token. Raises relay.RelayFailed where the
        worker refuses it for good, InstanceError where it cannot be reached (tried again)."""
        return await self._websocket({relay.SHARE_HEADER: token}, {})

    async def relay_probe(self) -> tuple[str | None, str]:
        """Whether a relay gets through to this worker's extension (a proxy in front of it must pass
        websockets), for the doctor: (its extension's version, "") when it does, else (None, why)."""
        try:
            ws = await self._websocket({}, {relay.PROBE: "1"})
        except (relay.RelayFailed, InstanceError) as exc:
            return None, str(exc)
        try:
            message = await ws.receive(timeout=PROBE.total)
            answer = json.loads(message.data) if message.type == aiohttp.WSMsgType.TEXT else None
        except asyncio.TimeoutError:
            return None, f"{self.url}{relay.PATH} opened a websocket but sent nothing"
        except ValueError:
            answer = None
        finally:
            await ws.close()
        if not isinstance(answer, dict) or answer.get(relay.PROBE) != "ok":
            return None, f"{self.url}{relay.PATH} did not answer the relay check as this extension does"
        return str(answer.get("extension_version") or "unknown"), ""

    async def events(self, client_id: str):
        """ComfyUI's own websocket (GET /ws?clientId=...), on which it sends the events of the prompts
        queued under ``client_id``: their step progress, for one. Raises InstanceError."""
        try:
            return await self._ws_connect("/ws", {}, {"clientId": client_id})
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise InstanceError(describe(self.url, exc)) from exc

    async def _ws_connect(self, path: str, headers: dict[str, str], params: dict[str, str]):
        # the whole handshake within DISPATCH's time (ws_connect itself would wait minutes)
        return await asyncio.wait_for(self.session.ws_connect(
            self.url + path, params=params, max_msg_size=relay.MAX_MESSAGE, autoping=True,
            timeout=aiohttp.ClientWSTimeout(ws_close=5) if hasattr(aiohttp, "ClientWSTimeout") else 5.0,
            **self._extras(headers)), DISPATCH.total)

    async def _websocket(self, headers: dict[str, str], params: dict[str, str]):
        url = self.url + relay.PATH
        try:
            return await self._ws_connect(relay.PATH, headers, params)
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (401, 403, 404, 410):
                raise relay.RelayFailed(_refused_relay(url, exc.status, exc.message)) from None
            if exc.status >= 500:  # the worker or a proxy in between failing for now: tried again
                raise InstanceError(f"{url} answered {exc.status}: {exc.message}", status=exc.status) from None
            raise relay.RelayFailed(f"{url} answered {exc.status} where a websocket was due: a proxy in front "
                                    f"of the worker must pass websockets (the Upgrade and Connection headers) "
                                    f"to it") from None
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise InstanceError(describe(self.url, exc), refused=isinstance(exc, aiohttp.ClientConnectorError)) from exc

    # --- the jobs API (ComfyUI from early 2026: GET /api/jobs/{id}, POST /api/jobs/{id}/cancel) ---
    async def has_jobs_api(self) -> bool:
        """Whether the instance answers GET /api/jobs; asked once a minute at most per instance."""
        known = self.features.get(self.url)
        if known is not None and time.monotonic() - known[1] < JOBS_API_RECHECK:
            return known[0]
        try:
            answer = await self._request("GET", "/api/jobs?limit=1", QUICK)
            found = isinstance(answer, dict) and "jobs" in answer
        except InstanceError as exc:
            if exc.status is None:
                raise  # no answer at all: ask again next time
            found = False  # a 404, or a page that is not the API
        self.features[self.url] = (found, time.monotonic())
        return found

    async def prompt_state(self, prompt_id: str) -> tuple[str, dict | None]:
        """Where one of our prompts is: ("pending" | "running", None), ("done", its history entry, or
        one in that shape from the jobs API), ("unknown", None) when the instance has no such
        prompt, or ("unfinished", None) when it cannot tell apart pending, running and unknown
        without its queue (ComfyUI without the jobs API)."""
        if not await self.has_jobs_api():
            entry = await self.history(prompt_id)
            return ("done", entry) if entry is not None else ("unfinished", None)
        try:
            job = await self._request("GET", f"/api/jobs/{prompt_id}", QUICK)
        except InstanceError as exc:
            if exc.status == 404:
                return "unknown", None
            raise
        status = job.get("status") if isinstance(job, dict) else None
        if status == "pending":
            return "pending", None
        if status == "in_progress":
            return "running", None
        if status in ("failed", "cancelled"):
            event = ["execution_error", job.get("execution_error") or {}] if status == "failed" \
                else ["execution_interrupted", {}]
            return "done", {"status": {"status_str": "error", "messages": [event]}}
        if status == "completed":
            return "done", {"status": job.get("execution_status") or {"status_str": "success", "messages": []}}
        raise InstanceError(f"{self.url}/api/jobs/{prompt_id} gave an unknown status {status!r}")

    async def withdraw(self, prompt_id: str) -> None:
        """Take one of our prompts back: deleted from the queue if pending, interrupted if it is
        the one running, left alone otherwise. With the jobs API that is one atomic request. Else
        the interrupt names the prompt, so a current ComfyUI stops only ours; it is sent only
        when the queue shows ours running, because a ComfyUI of early 2024 ignores the name and
        stops whatever runs."""
        if not prompt_id:
            return
        if await self.has_jobs_api():
            await self._request("POST", f"/api/jobs/{prompt_id}/cancel", QUICK, {})
            return
        running, pending = await self.queue()
        if prompt_id in pending:
            await self.delete_queued([prompt_id])
        if prompt_id in running:
            await self.interrupt(prompt_id)


def _error_text(text: str) -> str:
    try:
        data = json.loads(text)
    except ValueError:
        return text[:300]
    if isinstance(data, dict):
        error = data.get("error")
        details = []
        if isinstance(error, dict):
            details.append(error.get("message", ""))
            details.append(error.get("details", ""))
        elif error:
            details.append(str(error))
        for node_id, node_error in (data.get("node_errors") or {}).items():
            for e in node_error.get("errors", []):
                details.append(f"node {node_id} ({node_error.get('class_type', '?')}): "
                               f"{e.get('message', '')} {e.get('details', '')}".strip())
        return "; ".join(d for d in details if d)[:600] or text[:300]
    return text[:300]


class Interrupted(InstanceError):
    """The worker's prompt was interrupted while its results were being delivered."""


def deliver(send: Callable[..., "relay.Reply"], path: str, parts: list, deadline: float,
            interrupted: Callable[[], bool] = lambda: False) -> None:
    """Hand one frame (from wire.frame) to the master over the prompt's relay: ``send`` is
    Relays.request for the prompt's share token. Runs on the worker's execution thread.

    While the master answers "retry later" (503: it holds results for earlier jobs) the worker
    retries until ``deadline`` (time.monotonic()). ``interrupted`` is asked while it waits and
    between the megabytes of an upload: when it says so, delivery stops at once with Interrupted.
    """
    delay = 0.2
    while True:
        try:
            reply = send(path, parts, None, deadline, interrupted)
        except relay.Interrupted:
            raise Interrupted("interrupted while delivering results to the master") from None
        except (TimeoutError, relay.RelayFailed) as exc:
            raise InstanceError(f"cannot deliver results to the master: {exc}") from None
        if reply.status == 200:
            return
        last = f"the master answered {path} with {reply.status}: {_error_text(reply.text)}"
        if reply.status != 503:
            raise InstanceError(last)
        if time.monotonic() + delay > deadline:
            raise InstanceError(last + " and kept answering so until the job's timeout")
        _pause(delay, interrupted)
        delay = min(delay * 2, 2.0)


def _pause(seconds: float, interrupted: Callable[[], bool]) -> None:
    end = time.monotonic() + seconds
    while not interrupted() and time.monotonic() < end:
        time.sleep(min(0.05, max(0.0, end - time.monotonic())))


def _refused_relay(url: str, status: int, message: str) -> str:
    if status == 404:
        return (f"{url} does not exist: the worker's ComfyUI-Distributed is older than the master's (it "
                f"needs the relay, from 0.2.0); update it there")
    if status in (401, 403):
        return (f"{url} refused the prompt's credential ({status}): the worker no longer holds the prompt "
                f"(restarted, or its queue was cleared), or a proxy in front of it refused the request "
                f"(check the worker's headers in the config)")
    return f"{url} answered {status}: {message}"


def history_error(status: dict) -> str:
    """Why a prompt ended in error, from the status of its ComfyUI history entry."""
    for event, data in status.get("messages") or []:
        if event == "execution_error" and isinstance(data, dict):
            return (f"ComfyUI reported an error in node {data.get('node_id')} "
                    f"({data.get('node_type')}): {str(data.get('exception_message', '')).strip()}")
        if event == "execution_interrupted":
            return "its prompt was interrupted on the worker"
    return "its prompt ended with an error"
