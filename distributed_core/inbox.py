"""What the master answers to the requests a worker's prompt sends it over that prompt's relay
(relay.py), the one way work comes back from a worker:

  /distributed/result         a Collector share's result frame (jobs.receive)
  /distributed/spread/result  a spread prompt's values (spread.receive_values)
  /distributed/tiles/image    a tile worker's enlarged image, once the master has it
  /distributed/tiles/lease    ...the next batch of tiles to render
  /distributed/tiles/result   ...a rendered batch

Every request carries its share's token inside (the frame's header, or the JSON body) and is
checked against the job it names, as it was when these were HTTP routes of the master. None of
them is an HTTP route any more: nobody can deliver into a job without a relay the master opened.
"""
from __future__ import annotations

import asyncio
import json

import numpy as np

from . import spread, wire
from .jobs import receive
from .relay import Reply

MAX_JSON_BODY = 1 << 20
TILE_HEADER = "X-Distributed-Tiles"    # the tile grid and sampler settings beside the enlarged image
NOTICE_HEADER = "X-Distributed-Notice"  # beside a rendered batch: what the worker had to do differently
MAX_NOTICE = 500


def refusal(status: int, message: str) -> Reply:
    return Reply.of_json({"error": message}, status)


class Inbox:
    def __init__(self, runtime):
        self.runtime = runtime
        self.routes = {"/distributed/result": self.result, "/distributed/spread/result": self.spread_result,
                       "/distributed/tiles/image": self.tile_image, "/distributed/tiles/lease": self.tile_lease,
                       "/distributed/tiles/result": self.tile_result}

    async def answer(self, path: str, headers: dict, body, length: int) -> Reply:
        route = self.routes.get(path)
        if route is None:
            return refusal(404, f"the master answers no {path} over a relay (is the worker's ComfyUI-Distributed "
                                f"a different version from the master's?)")
        try:
            return await route(headers, body, length)
        except wire.Rejected as exc:
            return refusal(exc.status, exc.message)
        except wire.FrameError as exc:
            return refusal(400, f"bad frame: {exc}")

    async def result(self, _headers: dict, body, length: int) -> Reply:
        header = await receive(self.runtime.collectors.store, body, length)
        self.runtime.fleet.watcher.wake(header.job)  # its share's watch looks at once
        return Reply.of_json({"ok": True, "job": header.job, "unit": header.unit})

    async def spread_result(self, _headers: dict, body, length: int) -> Reply:
        dispatcher = self.runtime.spread
        if dispatcher is None:
            return refusal(409, f"this master does not spread its queue: {self.runtime.spread_unsupported}")

        def check(header: wire.ValueHeader) -> None:
            try:
                dispatcher.state.check(header.prompt, header.token)
            except LookupError as exc:
                raise wire.Rejected(410, str(exc)) from None
            except PermissionError as exc:
                raise wire.Rejected(403, str(exc)) from None
            except ValueError as exc:
                raise wire.Rejected(409, str(exc)) from None
        header, arrays = await spread.receive_values(body, length, check)
        try:
            values = await asyncio.get_running_loop().run_in_executor(None, spread.decode_values, header.tree, arrays)
            dispatcher.state.arrive(header.prompt, header.token, values)
        except (LookupError, PermissionError, ValueError) as exc:
            return refusal(410, str(exc))
        self.runtime.fleet.watcher.wake(header.prompt)  # its watch ends now
        dispatcher.wake()
        return Reply.of_json({"ok": True, "prompt_id": header.prompt})

    # --- a worker's Distributed Tiled Upscale ---------------------------------------------------
    @staticmethod
    async def _identify(body, length: int) -> tuple[str, str, str]:
        if length > MAX_JSON_BODY:
            raise wire.Rejected(413, f"request body is too large (at most {MAX_JSON_BODY} bytes)")
        try:
            value = json.loads(await body.readexactly(length) or b"{}")
        except (ValueError, UnicodeDecodeError, RecursionError, asyncio.IncompleteReadError):
            value = None
        if not isinstance(value, dict) or not all(isinstance(value.get(k), str) for k in ("job", "node", "token")):
            raise wire.Rejected(400, "send a JSON object with the strings job, node and token")
        return value["job"], value["node"], value["token"]

    async def tile_image(self, _headers: dict, body, length: int) -> Reply:
        job_id, node, token = await self._identify(body, length)
        found = self.runtime.upscales.board.image(job_id, node, token)
        if found is None:
            return Reply.of_json({"wait": 0.25}, 202)
        image, grid, params = found
        header = wire.Header(job_id, node, 0, "image", "float32", tuple(image.shape))
        info = json.dumps({"grid": grid.to_dict(), "params": params}, separators=(",", ":"))
        return Reply(200, {"Content-Type": wire.CONTENT_TYPE, TILE_HEADER: info}, list(wire.encode(header, image)))

    async def tile_lease(self, _headers: dict, body, length: int) -> Reply:
        job_id, node, token = await self._identify(body, length)
        board = self.runtime.upscales.board
        job = board.get(job_id)
        seconds = float(job.config.settings.job_timeout) if job else 60.0
        lease = board.lease(job_id, node, "", seconds, token=token)
        if lease.kind == "batch":
            return Reply.of_json({"batch": lease.batch, "tiles": list(lease.tiles)})
        return Reply.of_json({"batch": None, "done": lease.kind == "done", "wait": 0.25})

    async def tile_result(self, headers: dict, body, length: int) -> Reply:
        board = self.runtime.upscales.board
        notice = headers.get(NOTICE_HEADER, "")
        if len(notice) > MAX_NOTICE:
            raise wire.Rejected(400, f"the {NOTICE_HEADER} header holds at most {MAX_NOTICE} characters")
        header = await wire.read_header(body, length, "tile frame")
        participant, shape = board.expected_shape(header.job, header.collector, header.token, header.unit)
        if header.encoding != "raw" or header.dtype != "float32" or header.shape != shape or header.audio:
            raise wire.Rejected(400, f"batch {header.unit} must be raw float32 of shape {list(shape)} without "
                                     f"audio, not {header.encoding} {header.dtype} {list(header.shape)}")
        pixels = np.empty(shape, dtype=np.float32)
        await wire.read_into(body, memoryview(pixels.reshape(-1).view(np.uint8)), "tile frame")
        await wire.read_end(body)
        if not np.isfinite(pixels).all():
            raise wire.Rejected(400, f"batch {header.unit} holds values that are not finite numbers")
        if notice:  # what the worker had to do differently for it (a batch split to fit its GPU's memory)
            board.notice(header.job, participant, notice)
        first = board.complete(header.job, header.collector, header.unit, participant, pixels)
        return Reply.of_json({"ok": True, "batch": header.unit, "first": first})
