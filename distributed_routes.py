"""HTTP routes under /distributed/, the prompt hook and the middleware that ties a planned job to the
master's answer. Handlers parse, validate, delegate to distributed_core and answer with a clear status."""
from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

from aiohttp import web

from .distributed_core import (access, comfy_flags, comfy_internals, doctor, encode, inbox, local_instances,
                               provenance, ray_workers, relay, spread_queue)
from .distributed_core import config as config_file
from .distributed_core.gpus import detect_gpus
from .distributed_core.fleet import Fleet
from .distributed_core.runtime import Runtime
from .distributed_core.jobs import JobStore

log = logging.getLogger("comfyui-distributed")

MAX_JSON_BODY = inbox.MAX_JSON_BODY  # one limit for JSON bodies, over HTTP and over a relay
PROMPT_PATHS = ("/prompt", "/api/prompt")
QUEUE_PATHS = ("/queue", "/api/queue")

WORKER_FIELDS = {"name", "host", "port", "url", "ca_bundle", "headers", "device", "enabled", "extra_args"}


def own_address() -> tuple[str, int]:
    hosts, port, _cpu = comfy_internals.server_args()
    return hosts[0], port


def comfy_folder() -> Path:
    """The folder of the running ComfyUI's code (main.py, comfy/cli_args.py), which its local workers
    run too; not folder_paths.base_path, which --base-directory moves elsewhere."""
    import folder_paths
    return Path(os.path.dirname(os.path.abspath(folder_paths.__file__)))


def input_dir() -> Path:
    import folder_paths
    return Path(folder_paths.get_input_directory())


def error(status: int, message: str, **extra) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def _too_large(size: int) -> web.HTTPRequestEntityTooLarge:
    return web.HTTPRequestEntityTooLarge(max_size=MAX_JSON_BODY, actual_size=size,
                                         text=json.dumps({"error": f"request body is too large (at most "
                                                                   f"{MAX_JSON_BODY} bytes)"}),
                                         content_type="application/json")


async def read_json(request: web.Request):
    """The whole body as JSON, however many TCP segments it arrives in, up to MAX_JSON_BODY."""
    if request.content_length is not None and request.content_length > MAX_JSON_BODY:
        raise _too_large(request.content_length)
    chunks, size = [], 0
    while True:
        chunk = await request.content.read(1 << 16)  # what has arrived, up to 64 KiB; b"" at the end
        if not chunk:
            break
        size += len(chunk)
        if size > MAX_JSON_BODY:
            raise _too_large(size)
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        return json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise web.HTTPBadRequest(text=json.dumps({"error": f"request body is not valid JSON: {exc}"}),
                                 content_type="application/json") from None
    except RecursionError:
        raise web.HTTPBadRequest(text=json.dumps({"error": "request body is nested too deeply"}),
                                 content_type="application/json") from None


def setup(server) -> Runtime:
    """Wire the extension into a running PromptServer; called once from __init__, which hands the
    runtime built here to the nodes as well."""
    def emit(job) -> None:
        server.send_sync("distributed_progress", job.summary())

    if comfy_internals.parallel_saves(encode.deferred_saves, provenance.batch_texts) and encode.install():
        log.info("[Distributed] PNG saves use %d threads", encode.workers())
    ray = ray_workers.RayWorkers(lambda: config_file.load().config.ray, lambda: str(comfy_folder()))
    fleet = Fleet(lambda: ray.merged(config_file.load()), own_address, input_dir)
    runtime = Runtime(fleet, JobStore(on_change=emit), partial_execution=comfy_internals.runs_partial_targets())
    runtime.input_spec = _input_spec
    runtime.ray = ray
    server.add_on_prompt_handler(runtime.rewrite)

    async def begin(_app) -> None:  # the reachability checks run on the server's loop, once it runs
        fleet.begin()
        ray.start()  # its own thread: Ray's client blocks
        runtime.relays.loop = fleet.loop
    server.app.on_startup.append(begin)
    # first, before ComfyUI's own middlewares (set up before any extension loads)
    server.app.middlewares.insert(0, _access_middleware(access.load_or_create()))
    server.app.middlewares.append(_prompt_middleware(runtime))
    processes = local_instances.LocalProcesses()  # local workers this master started from the panel
    _add_routes(server.routes, runtime, processes)
    _add_worker_routes(server.routes, processes)
    setup_spread(server, runtime)
    _add_spread_routes(server.routes, runtime)
    server.app.middlewares.append(_interrupt_middleware(runtime))
    runtime.upscales.board.on_change = emit
    _add_doctor_routes(server.routes, runtime.fleet)
    loaded = config_file.load()
    if loaded.error:
        log.warning("[Distributed] gpu_config problem: %s. Running with defaults; the file was left "
                    "as it is. Fix it, or save settings from the Distributed panel.", loaded.error)
    return runtime


def _guarded_paths(request: web.Request) -> list[str]:
    """The request's path and the path of the route it resolved to (both are checked, so that no
    spelling of a path reaches our handlers unchecked)."""
    paths = [request.path]
    resource = getattr(request.match_info.route, "resource", None)
    canonical = getattr(resource, "canonical", None)
    if isinstance(canonical, str):
        paths.append(canonical)
    return paths


def _ends(request: web.Request) -> tuple[str | None, str | None]:
    """(the peer's IP address, the IP address the connection arrived at), from the socket itself."""
    transport = request.transport
    if transport is None:
        return None, None

    def address(info) -> str | None:
        return info[0] if isinstance(info, (tuple, list)) and info and isinstance(info[0], str) else None
    return address(transport.get_extra_info("peername")), address(transport.get_extra_info("sockname"))


def _access_middleware(secret: str):
    """The access rules of distributed_core.access for every route under /distributed/. It runs
    before ComfyUI's own middlewares, so the answer does not depend on the ComfyUI version."""
    @web.middleware
    async def middleware(request: web.Request, handler):
        paths = [p for p in _guarded_paths(request) if access.is_guarded(p)]
        if not paths:
            return await handler(request)
        origin = request.headers.get("Origin")
        if origin is not None and not access.parses_as_origin(origin):
            return error(400, f"the Origin header {origin[:80]!r} is not an origin such as "
                              "http://host:port: send a valid one, or none")
        peer, local = _ends(request)
        for path in paths:
            reason = access.refusal(path, request.headers, peer, local, secret, str(access.secret_path()))
            if reason:
                return error(403, reason, need="local-browser" if access.route_path(path) == access.SECRET_PATH
                             else "secret")
        return await handler(request)

    return middleware


def _prompt_middleware(runtime: Runtime):
    """Each POST /prompt as one runtime.Submission: its jobs start once the master has accepted the
    prompt, so that a prompt the master rejects leaves nothing running on the workers."""

    @web.middleware
    async def middleware(request: web.Request, handler):
        if request.method == "POST" and request.path in QUEUE_PATHS:
            response = await handler(request)
            if response.status == 200:  # prompts deleted or the queue cleared: their jobs end now
                runtime.fleet.master_queue_changed()
            return response
        if request.method != "POST" or request.path not in PROMPT_PATHS:
            return await handler(request)
        submission = runtime.submission()
        try:
            with submission:
                response = await handler(request)
        except BaseException:
            submission.abandoned("the master could not take the prompt")
            raise
        if submission.refusal and response.status == 400:  # ComfyUI's own shape, so its page shows it
            submission.abandoned(submission.refusal)
            return web.json_response({"error": {"type": "distributed_refused", "message": submission.refusal,
                                                "details": submission.refusal, "extra_info": {}},
                                      "node_errors": {}}, status=400)
        prompt_id = ""
        if response.status == 200 and (submission.planned or submission.keys):
            try:
                prompt_id = str(json.loads(response.body)["prompt_id"])
            except (TypeError, ValueError, KeyError):
                prompt_id = ""
        submission.accepted(prompt_id)
        return response

    return middleware


def _add_routes(routes: web.RouteTableDef, runtime: Runtime, processes) -> None:
    fleet = runtime.fleet

    @routes.get("/distributed/config")
    async def get_config(request: web.Request) -> web.Response:
        loaded = config_file.load()
        return web.json_response({"config": config_file.public_dict(loaded.config), "path": str(loaded.path),
                                  "error": loaded.error})

    @routes.post("/distributed/config")
    async def post_config(request: web.Request) -> web.Response:
        data = await read_json(request)
        async with config_lock:
            old = config_file.load().config
            try:  # header values shown as hidden keep what they are
                new = config_file.parse(config_file.keep_hidden(data, old))
            except config_file.ConfigError as exc:
                return error(400, "invalid config: " + "; ".join(exc.errors), errors=exc.errors)
            refused = access.changed_extra_args_errors(old, new, comfy_flags.read(comfy_folder()))
            if refused:
                return error(400, "invalid config: " + "; ".join(refused), errors=refused)
            path = await asyncio.get_running_loop().run_in_executor(None, config_file.save, new)
        return web.json_response({"config": config_file.public_dict(new), "path": str(path), "error": ""})

    @routes.get("/distributed/status")
    async def get_status(request: web.Request) -> web.Response:
        loaded = fleet.load_config()  # the config's workers and the Ray workers that answered
        instances = await fleet.status(loaded.config)
        for instance in instances:  # the panel offers Stop only for what this master started
            instance["managed"] = processes.is_running(instance["id"])
        return web.json_response({"instances": instances, "config_error": loaded.error,
                                  "mode": loaded.config.settings.mode, "ray": runtime.ray.view(),
                                  **runtime.jobs()})

    @routes.get("/distributed/secret")
    async def get_secret(request: web.Request) -> web.Response:
        # the access middleware lets only a browser on the master's own machine get here
        return web.json_response({"header": access.HEADER, "secret": access.load_or_create(),
                                  "path": str(access.secret_path())})

    @routes.post("/distributed/clear_vram")
    async def clear_vram(request: web.Request) -> web.Response:
        results = await fleet.broadcast(fleet.config(), "free")
        return web.json_response({"results": results})

    @routes.post("/distributed/interrupt")
    async def interrupt(request: web.Request) -> web.Response:
        await runtime.interrupt_all("interrupted from the Distributed panel")
        results = await fleet.broadcast(fleet.config(), "interrupt")
        return web.json_response({"results": results})

    @routes.get(relay.PATH)
    async def relay_socket(request: web.Request) -> web.StreamResponse:
        """On a worker: the master opens one of these for every prompt it sends here, with the
        prompt's share token, and the prompt's work goes back over it (distributed_core/relay.py).
        With ?probe=1 and no token: the worker doctor's check that websockets get through."""
        token = request.headers.get(relay.SHARE_HEADER, "")
        probe = not token and request.query.get(relay.PROBE) == "1"
        if not probe and not runtime.relays.wanted(token):
            return error(403, f"no prompt queued here holds that {relay.SHARE_HEADER} credential (a relay is "
                              "opened by the master that sent the prompt, while it runs)")
        ws = web.WebSocketResponse(max_msg_size=relay.MAX_MESSAGE, compress=False)  # images: deflate costs, saves little
        await ws.prepare(request)
        if probe:
            await ws.send_str(json.dumps({relay.PROBE: "ok", "extension_version": doctor.extension_version()}))
            await ws.close()
        else:
            await runtime.relays.attach(token, ws)
        return ws


# Read-modify-write of the config happens one request at a time, so concurrent edits never lose
# each other's changes; the file write itself runs off the event loop.
config_lock = asyncio.Lock()


async def _save_changed(change) -> web.Response:
    """Apply ``change`` to the config as a plain dict, validate the result and save it.

    ``change`` returns an error response to refuse, or the id of the worker it touched."""
    async with config_lock:
        old = config_file.load().config
        data = old.to_dict()
        outcome = change(data)
        if isinstance(outcome, web.Response):
            return outcome
        try:
            new = config_file.parse(data)
            refused = access.changed_extra_args_errors(old, new, comfy_flags.read(comfy_folder()))
            if refused:
                raise config_file.ConfigError(refused)
        except config_file.ConfigError as exc:
            # "workers[3].port: ..." -> "port: ...": the form shows one worker
            errors = [e.split("].", 1)[1] if e.startswith("workers[") and "]." in e else e for e in exc.errors]
            return error(400, "; ".join(errors), errors=errors)
        await asyncio.get_running_loop().run_in_executor(None, config_file.save, new)
    worker = new.worker(outcome) if outcome else None
    shown = config_file.public_dict(new)
    return web.json_response({"config": shown,
                              "worker": worker and next(w for w in shown["workers"] if w["id"] == worker.id)})


def _worker_fields(body) -> dict | web.Response:
    if not isinstance(body, dict):
        return error(400, "body must be a JSON object of worker fields")
    unknown = set(body) - WORKER_FIELDS
    if unknown:
        return error(400, f"unknown field(s): {', '.join(sorted(unknown))} "
                          f"(allowed: {', '.join(sorted(WORKER_FIELDS))})")
    return body


def _add_worker_routes(routes: web.RouteTableDef, processes) -> None:
    def index_of(data: dict, worker_id: str) -> int | None:
        return next((i for i, w in enumerate(data["workers"]) if w["id"] == worker_id), None)

    def not_found(worker_id: str) -> web.Response:
        return error(404, f"no worker {worker_id!r} in the config")

    @routes.get("/distributed/gpus")
    async def get_gpus(request: web.Request) -> web.Response:
        gpus = await asyncio.get_running_loop().run_in_executor(None, detect_gpus)
        return web.json_response({"gpus": gpus})

    @routes.post("/distributed/workers")
    async def add_worker(request: web.Request) -> web.Response:
        fields = _worker_fields(await read_json(request))
        if isinstance(fields, web.Response):
            return fields

        def change(data: dict):
            worker_id = config_file.new_worker_id(config_file.parse(data))
            data["workers"].append({"id": worker_id, **fields})
            return worker_id
        return await _save_changed(change)

    @routes.patch("/distributed/workers/{worker_id}")
    async def edit_worker(request: web.Request) -> web.Response:
        worker_id = request.match_info["worker_id"]
        fields = _worker_fields(await read_json(request))
        if isinstance(fields, web.Response):
            return fields

        def change(data: dict):
            i = index_of(data, worker_id)
            if i is None:
                return not_found(worker_id)
            worker = data["workers"][i]
            if fields.get("url"):  # given by address now: host and port no longer apply, and back
                worker.pop("host", None)
                worker.pop("port", None)
            elif "host" in fields or "port" in fields or fields.get("url") == "":
                worker.pop("url", None)
            if isinstance(fields.get("headers"), dict):  # a value shown as hidden keeps what it is
                before = worker.get("headers") or {}
                fields["headers"] = {name: before.get(name, value) if value == config_file.HIDDEN else value
                                     for name, value in fields["headers"].items()
                                     if value != config_file.HIDDEN or name in before}
            worker.update({key: value for key, value in fields.items() if not (key == "url" and value == "")})
            return worker_id
        return await _save_changed(change)

    @routes.delete("/distributed/workers/{worker_id}")
    async def remove_worker(request: web.Request) -> web.Response:
        worker_id = request.match_info["worker_id"]

        def change(data: dict):
            i = index_of(data, worker_id)
            if i is None:
                return not_found(worker_id)
            del data["workers"][i]
            return None
        return await _save_changed(change)

    @routes.post("/distributed/workers/{worker_id}/start")
    async def start_worker(request: web.Request) -> web.Response:
        import sys

        on_cpu = comfy_internals.server_args()[2]
        config = config_file.load().config
        worker = config.worker(request.match_info["worker_id"])
        if worker is None:
            return not_found(request.match_info["worker_id"])
        if not worker.is_local:
            return error(409, f"{worker.label} runs on {worker.host}; start it on that machine")
        named = os.environ.get(config_file.ENV_VAR)
        # Asking nvidia-smi which NUMA node each GPU is on takes a moment: off the event loop. The
        # process itself starts from the loop's thread, which lives as long as ComfyUI (see LocalProcesses).
        placements = await asyncio.get_running_loop().run_in_executor(
            None, local_instances.cpu_placements, config, on_cpu)
        try:
            pid = processes.start_worker(config, worker, comfy_folder(), sys.executable,
                                         cpu=on_cpu, config_file=Path(named) if named else None,
                                         placements=placements, master_args=sys.argv[1:])
        except local_instances.LauncherError as exc:
            return error(409, str(exc))
        return web.json_response({"ok": True, "pid": pid})

    @routes.post("/distributed/workers/{worker_id}/stop")
    async def stop_worker(request: web.Request) -> web.Response:
        worker_id = request.match_info["worker_id"]
        if not processes.is_running(worker_id):
            return error(409, f"{worker_id} was not started from this master; stop it where it was started")
        await asyncio.get_running_loop().run_in_executor(None, processes.stop_worker, worker_id)
        return web.json_response({"ok": True})

    @routes.get("/distributed/workers/{worker_id}/log")
    async def worker_log(request: web.Request) -> web.Response:
        worker_id = request.match_info["worker_id"]
        try:
            lines = int(request.query.get("lines", "200"))
            text = local_instances.read_log_tail(worker_id, lines)
        except ValueError as exc:
            return error(400, str(exc))
        return web.json_response({"id": worker_id, "log": text, "running": processes.is_running(worker_id),
                                  "path": str(local_instances.log_path(worker_id))})


def _has_input(name: str) -> bool:
    """Whether the master's input folder holds this file (a loader's value, maybe in a subfolder)."""
    root = input_dir().resolve()
    path = (root / name.removesuffix(" [input]")).resolve()
    return root in path.parents and path.is_file()


def _add_doctor_routes(routes: web.RouteTableDef, fleet: Fleet) -> None:
    @routes.post("/distributed/check")
    async def check(request: web.Request) -> web.Response:
        body = await read_json(request)
        prompt = body.get("prompt") if isinstance(body, dict) else None
        problem = "it is not an object" if not isinstance(body, dict) else (
            doctor.prompt_problem(prompt) if prompt is not None else None)
        if problem:
            return error(400, f'body must be {{}} or {{"prompt": <a prompt in ComfyUI\'s API format>}}: {problem}')
        config = fleet.config()
        instances = await doctor.check(fleet, config, prompt or None, _has_input)
        return web.json_response({"instances": instances, "extension_version": doctor.extension_version()})


# --- the spread queue (distributed_core/spread.py) -------------------------------------------------

def _return_type(class_type: str, index: int) -> str | None:
    """A node class's declared output type, read from ComfyUI's node mappings."""
    import nodes

    try:
        types = getattr(nodes.NODE_CLASS_MAPPINGS.get(class_type), "RETURN_TYPES", None)
        kind = types[index] if isinstance(types, (list, tuple)) and 0 <= index < len(types) else None
    except Exception:  # noqa: BLE001 - a node we cannot read does not spread
        return None
    return kind if isinstance(kind, str) else None


def _input_spec(class_type: str, name: str):
    """A node class's declared spec of one input, ``(type, options)``, read from ComfyUI's node
    mappings; None for a class or input it does not declare."""
    import nodes

    try:
        declared = nodes.NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()
    except Exception:  # noqa: BLE001 - a node we cannot read takes no Distributed Value
        return None
    for group in ("required", "optional"):
        section = declared.get(group) if isinstance(declared, dict) else None
        if isinstance(section, dict) and name in section:
            return section[name]
    return None


def setup_spread(server, runtime: Runtime) -> None:
    """Install the spread queue on the master's ComfyUI queue (guarded: a queue shaped otherwise
    leaves ComfyUI's own queue alone, and the panel says why)."""
    runtime.spread, runtime.spread_unsupported = spread_queue.install(
        getattr(server, "prompt_queue", None), runtime.fleet, _return_type, runtime.fleet.load_config,
        emit=lambda summary: server.send_sync("distributed_spread", summary), config_path=config_file.config_path)

    async def start(_app) -> None:
        if runtime.spread is not None:
            runtime.fleet.spawn(runtime.spread.run())
    server.app.on_startup.append(start)


def _add_spread_routes(routes: web.RouteTableDef, runtime: Runtime) -> None:
    @routes.get("/distributed/spread")
    async def get_spread(request: web.Request) -> web.Response:
        """Who renders which queued prompt, and the last ones finished."""
        dispatcher = runtime.spread
        if dispatcher is None:
            return web.json_response({"supported": False, "reason": runtime.spread_unsupported, "enabled": False,
                                      "prompts": [], "recent": []})
        dispatcher.refresh()  # the switch just ticked in the panel shows at once (a stat when unchanged)
        return web.json_response({"supported": True, "reason": "", "enabled": dispatcher.enabled(),
                                  "prompts": dispatcher.state.summary(), "recent": list(dispatcher.state.recent)})


INTERRUPT_PATHS = ("/interrupt", "/api/interrupt")


def _interrupt_middleware(runtime: Runtime):
    """ComfyUI's POST /interrupt naming a prompt (the current frontend's cancel) that a worker
    renders: it is withdrawn there, and the master's run of it ends as interrupted."""

    @web.middleware
    async def middleware(request: web.Request, handler):
        if request.method == "POST" and request.path in INTERRUPT_PATHS and runtime.spread is not None:
            try:
                body = json.loads(await request.read() or b"{}")  # aiohttp keeps the body for the handler
            except (ValueError, UnicodeDecodeError):
                body = None
            prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
            if isinstance(prompt_id, str) and prompt_id:
                await runtime.spread.interrupt(prompt_id)
        return await handler(request)

    return middleware
