"""A real TLS reverse proxy for the tests: https on loopback under a path prefix, in front of one
ComfyUI, optionally refusing requests that lack a header (as a cloud pod's proxy with a token
does); and a throwaway CA with a certificate for localhost and 127.0.0.1, made with openssl."""
from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import threading
from pathlib import Path

import aiohttp
from aiohttp import web

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "host", "content-length"}


def make_certificates(folder: Path) -> dict[str, Path]:
    """{"ca": CA certificate, "cert": server certificate, "key": its key}, for localhost and 127.0.0.1."""
    if shutil.which("openssl") is None:
        raise RuntimeError("the TLS tests need the openssl command (Debian: apt-get install openssl)")
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"ca": folder / "ca.pem", "ca_key": folder / "ca.key", "cert": folder / "server.pem",
             "key": folder / "server.key", "csr": folder / "server.csr", "ext": folder / "server.ext"}
    paths["ext"].write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                            "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
                            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(paths["ca_key"]), "-out",
            str(paths["ca"]), "-days", "2", "-subj", "/CN=ComfyUI-Distributed test CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(paths["key"]), "-out", str(paths["csr"]),
            "-subj", "/CN=localhost")
    openssl("x509", "-req", "-in", str(paths["csr"]), "-CA", str(paths["ca"]), "-CAkey", str(paths["ca_key"]),
            "-CAcreateserial", "-out", str(paths["cert"]), "-days", "2", "-extfile", str(paths["ext"]))
    return paths


class TlsProxy:
    """https://127.0.0.1:<port><prefix>/... forwarded to ``target`` (http://host:port)."""

    def __init__(self, target: str, cert: Path, key: Path, prefix: str = "/comfy"):
        self.target = target.rstrip("/")
        self.prefix = prefix
        self.required: tuple[str, str] | None = None  # (header, value) every request must carry
        self.seen_paths: list[str] = []
        self.pass_websockets = True
        self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._tls.load_cert_chain(str(cert), str(key))
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}{self.prefix}"

    def start(self) -> "TlsProxy":
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the TLS proxy did not start")
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self._tls)
        self._loop.run_until_complete(site.start())
        self.port = runner.addresses[0][1]

        async def session() -> aiohttp.ClientSession:
            return aiohttp.ClientSession()
        self._session = self._loop.run_until_complete(session())
        self._ready.set()
        self._loop.run_forever()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        path = request.rel_url.path
        if not path.startswith(self.prefix + "/"):
            return web.Response(status=404, text="not under the proxy's prefix")
        if self.required is not None and request.headers.get(self.required[0]) != self.required[1]:
            return web.Response(status=401, text="the proxy wants its token")
        self.seen_paths.append(path[len(self.prefix):])
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        if request.headers.get("Upgrade", "").lower() == "websocket":
            if not self.pass_websockets:  # as a proxy that forwards plain requests only
                return web.Response(status=400, text="this proxy does not pass websockets")
            return await self._forward_websocket(request, path[len(self.prefix):], headers)
        body = await request.read()
        async with self._session.request(request.method, self.target + path[len(self.prefix):],
                                         params=request.rel_url.query, headers=headers, data=body or None,
                                         allow_redirects=False) as upstream:
            data = await upstream.read()
            reply = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS | {"content-encoding"}}
            return web.Response(status=upstream.status, body=data, headers=reply)

    async def _forward_websocket(self, request: web.Request, path: str, headers: dict) -> web.StreamResponse:
        """A websocket both ways, message by message (the relays of distributed_core/relay.py)."""
        headers = {k: v for k, v in headers.items() if not k.lower().startswith("sec-websocket")}
        try:
            upstream = await self._session.ws_connect(self.target + path, params=request.rel_url.query,
                                                      headers=headers, max_msg_size=16 << 20)
        except aiohttp.WSServerHandshakeError as exc:
            return web.Response(status=exc.status, text=exc.message)
        downstream = web.WebSocketResponse(max_msg_size=16 << 20)
        await downstream.prepare(request)

        async def pump(source, sink) -> None:
            async for message in source:
                if message.type == aiohttp.WSMsgType.TEXT:
                    await sink.send_str(message.data)
                elif message.type == aiohttp.WSMsgType.BINARY:
                    await sink.send_bytes(message.data)
            await sink.close()
        await asyncio.gather(pump(upstream, downstream), pump(downstream, upstream), return_exceptions=True)
        await upstream.close()
        return downstream
