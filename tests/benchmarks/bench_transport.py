"""How fast a worker's batch reaches the master's Collector, against the common baseline.

    python tests/benchmarks/bench_transport.py [--rounds 5] [--batch 8] [--size 1024]

Two processes on loopback. The receiver (the master) runs the extension's real receive path
(distributed_core.jobs.receive into a JobStore, then the Collector's take) and, beside it, the
baseline this field commonly uses: each image a PNG (compress_level 0), base64 inside a JSON POST,
one POST per image, decoded back to a float tensor and concatenated on the master. The sender
(this process, the worker) times each from the first byte encoded to the final batch assembled.

Ours runs two ways, side by side: over the relay that the master opens to the worker
(distributed_core/relay.py: a websocket from the master, the way results travel now), and as one
HTTP POST from the worker to the master (the way they travelled before the relay), to show what
the relay costs.
The receiver samples its own RSS to report the peak extra memory while collecting, as a multiple
of the final batch's size. Needs numpy, torch, pillow, aiohttp and requests (the test environment).
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distributed_core import wire  # noqa: E402


def rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    def __init__(self):
        self.base = rss()
        self.peak = self.base
        self.running = True
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.0005)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss())
        return self.peak - self.base


def serve(port: int, batch: int) -> None:
    """The master's side: our receive path and the baseline's, one job at a time."""
    import asyncio

    import torch
    from aiohttp import web
    from PIL import Image

    import aiohttp

    from distributed_core import relay
    from distributed_core.jobs import Job, JobStore, Share, receive

    state: dict = {}
    carrying: list = []

    async def collected(body, length) -> dict:
        await receive(state["store"], body, length)
        (final,) = state["store"].take("bench", "c")
        tensor = torch.from_numpy(final)
        extra = state["sampler"].stop()
        state.clear()
        return {"images": int(tensor.shape[0]), "extra": extra, "final": tensor.nbytes}

    async def answer(path, headers, body, length):
        return relay.Reply.of_json(await collected(body, length))

    async def carry(request):
        """Open the relay to the worker's prompt (its port and token), as the master does at dispatch."""
        body = await request.json()
        from distributed_core.client import InstanceClient
        session = aiohttp.ClientSession()
        client = InstanceClient(session, f"http://127.0.0.1:{body['port']}")
        stop = asyncio.Event()
        carrying.append(stop)
        asyncio.ensure_future(relay.carry(lambda: client.relay(body["token"]), answer, stop, "bench"))
        return web.json_response({"ok": True})

    async def reset(request):
        state.clear()
        store = JobStore()
        job = Job(id="bench", collectors=["c"], units=[0])
        job.shares["worker"] = share = Share("worker", "worker", [0])
        store.add(job)
        state.update(store=store, job=job, parts=[], sampler=PeakSampler())
        return web.json_response({"token": share.token})

    async def ours(request):
        return web.json_response(await collected(request.content, request.content_length))

    async def baseline(request):
        body = await request.json()
        image = Image.open(io.BytesIO(base64.b64decode(body["image"])))
        state["parts"].append(torch.from_numpy(np.asarray(image).astype(np.float32) / 255.0).unsqueeze(0))
        if len(state["parts"]) < batch:
            return web.json_response({"ok": True})
        tensor = torch.cat(state["parts"], dim=0)
        extra = state["sampler"].stop()
        state.clear()
        return web.json_response({"images": int(tensor.shape[0]), "extra": extra, "final": tensor.nbytes})

    app = web.Application(client_max_size=1 << 30)
    app.add_routes([web.post("/reset", reset), web.post("/ours", ours), web.post("/baseline", baseline),
                    web.post("/carry", carry)])
    web.run_app(app, host="127.0.0.1", port=port, print=None)


def images(batch: int, size: int) -> np.ndarray:
    """Smooth gradients with a little grain, like rendered images (pure noise would not compress)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = np.stack([x, y, (x + y) / 2], axis=-1)
    return np.clip(base[None] * rng.uniform(0.5, 1, (batch, 1, 1, 3)) + rng.normal(0, 0.02, (batch, size, size, 3)),
                   0, 1).astype(np.float32)


class Worker:
    """This process as a worker: the extension's relay route on a loop of its own (as in ComfyUI's
    server), and Relays.request on the calling thread (as on ComfyUI's execution thread)."""

    def __init__(self):
        import asyncio

        from aiohttp import web

        from distributed_core import relay
        from harness import free_port
        self.relays = relay.Relays(lambda token: True)
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        async def route(request):
            ws = web.WebSocketResponse(max_msg_size=relay.MAX_MESSAGE, compress=False)
            await ws.prepare(request)
            await self.relays.attach(request.headers.get(relay.SHARE_HEADER, ""), ws)
            return ws

        def run():
            asyncio.set_event_loop(self.loop)
            app = web.Application()
            app.router.add_get(relay.PATH, route)
            runner = web.AppRunner(app)
            self.loop.run_until_complete(runner.setup())
            self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
            self.relays.loop = self.loop
            started.set()
            self.loop.run_forever()
        threading.Thread(target=run, daemon=True).start()
        started.wait(10)

    def open(self, session, url: str, token: str) -> None:
        """The master opens the prompt's relay (at dispatch, long before the results are ready)."""
        session.post(url + "/carry", json={"port": self.port, "token": token})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            channel = self.relays._channels.get(token)
            if channel is not None and channel.ws is not None:
                return
            time.sleep(0.01)
        raise RuntimeError("the relay did not open")


class Body:
    """The frame's buffers as one request body without joining them, as the worker's POST used to
    send it; its length lets requests send a Content-Length."""

    def __init__(self, parts):
        self.parts = parts

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __iter__(self):
        from distributed_core.relay import pieces
        return (bytes(c) for c in pieces(self.parts))


def run_ours(session, url: str, data, transport: str, worker: "Worker | None") -> dict:
    """What a worker's Collector does with its IMAGE tensor: encode and deliver, over the prompt's
    relay (``worker``), or POSTed to the master (None: before the relay)."""
    token = session.post(url + "/reset").json()["token"]
    if worker is not None:
        worker.open(session, url, token)
    started = time.perf_counter()
    parts = wire.frame("bench", "c", 0, 1, token, data, transport)
    size = sum(len(p) for p in parts)
    if worker is not None:
        resp = worker.relays.request(token, "/distributed/result", parts, None, time.monotonic() + 120).json()
    else:
        resp = session.post(url + "/ours", data=Body(parts), headers={"Content-Type": wire.CONTENT_TYPE}).json()
    return {**resp, "seconds": time.perf_counter() - started, "bytes": size}


def run_baseline(session, url: str, data) -> dict:
    """What the common approach does with the same tensor: one PNG per image, base64, JSON."""
    from PIL import Image

    session.post(url + "/reset")
    started = time.perf_counter()
    sent = 0
    for image in data.numpy():
        out = io.BytesIO()
        Image.fromarray(np.clip(image * 255, 0, 255).astype(np.uint8)).save(out, "PNG", compress_level=0)
        body = json.dumps({"image": base64.b64encode(out.getvalue()).decode()})
        sent += len(body)
        resp = session.post(url + "/baseline", data=body, headers={"Content-Type": "application/json"}).json()
    return {**resp, "seconds": time.perf_counter() - started, "bytes": sent}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.batch)
        return 0

    import requests

    from harness import free_port
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--batch", str(args.batch)])
    url = f"http://127.0.0.1:{port}"
    try:
        session = requests.Session()
        for _ in range(200):
            try:
                session.post(url + "/reset")
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        import torch
        data = torch.from_numpy(images(args.batch, args.size))  # an IMAGE tensor, as the Collector gets
        worker = Worker()
        paths = ["baseline", "post-float32", "float32", "post-uint8", "uint8", "png"]
        results: dict[str, list[dict]] = {p: [] for p in paths}
        for _round in range(args.rounds + 1):  # the first round warms up and is not counted
            for path in paths:  # interleaved, so drift hits every path alike
                r = run_baseline(session, url, data) if path == "baseline" else \
                    run_ours(session, url, data, path.split("-")[-1], None if path.startswith("post-") else worker)
                assert r["images"] == args.batch, r
                if _round:
                    results[path].append(r)
    finally:
        server.terminate()
        server.wait(10)

    final_mb = args.batch * args.size * args.size * 3 * 4 / 2**20
    print(f"{args.batch} images of {args.size}x{args.size}, loopback, median of {args.rounds} rounds; "
          f"final batch {final_mb:.0f} MB")
    print(f"{'path':<34}{'images/s':>10}{'x baseline':>12}{'peak extra memory':>20}{'MB sent':>10}")
    summary = {}
    base_rate = args.batch / statistics.median(r["seconds"] for r in results["baseline"])
    names = {"baseline": "baseline (PNG+base64+JSON)", "post-float32": "ours, float32, POST (before)",
             "float32": "ours, float32, relay (lossless)", "post-uint8": "ours, uint8, POST (before)",
             "uint8": "ours, uint8, relay (8-bit)", "png": "ours, png, relay (compact)"}
    for path in paths:
        rate = args.batch / statistics.median(r["seconds"] for r in results[path])
        extra = max(r["extra"] for r in results[path]) / results[path][0]["final"]
        sent = results[path][0]["bytes"] / 2**20
        summary[path] = {"images_per_s": round(rate, 2), "vs_baseline": round(rate / base_rate, 2),
                         "peak_extra_memory_x_final": round(extra, 2), "mb_sent": round(sent, 1)}
        print(f"{names[path]:<34}{rate:>10.2f}{rate / base_rate:>11.1f}x{extra:>18.2f}x{sent:>10.1f}")
    print(json.dumps({"bench": "transport", "batch": args.batch, "size": args.size, **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
