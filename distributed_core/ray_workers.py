"""Workers that a Ray cluster places and restarts: one ComfyUI per GPU, found by the master itself.

With a ``ray`` section in the config, the master connects to the cluster as a driver and keeps
``ray.workers`` actors (one per GPU of the cluster when 0), each asking Ray for one GPU
(``num_gpus=1``: Ray sets its ``CUDA_VISIBLE_DEVICES``). An actor starts a ComfyUI with this
extension on a free port of its node and exits when that ComfyUI exits, so that Ray starts it
again (``max_restarts=-1``), on a new port. The master asks each actor where it is every few
seconds; the fleet adds the actors that answer to the config's own workers (``merged``), with ids
``ray-1``, ``ray-2``..., so every kind of job, the doctor and the panel use them as they use
configured workers, and a restarted one rejoins by itself.

Ray is optional: it is imported here only, and only when the config names a cluster. Without it,
``error`` says how to install it, and the master goes on with its configured workers.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import threading
from dataclasses import dataclass
from typing import Callable

from .config import RAY_ID_PREFIX, RAY_WORKER_ENV, Loaded, RaySettings, Worker

log = logging.getLogger("comfyui-distributed")

NAMESPACE = "comfyui-distributed"
WORKER_ENV = RAY_WORKER_ENV  # set in a Ray worker's ComfyUI: it runs no pool, and is a worker only
INSTALL = "pip install 'ray[default]'"
POLL_SECONDS = 2.0
ANSWER_SECONDS = 3.0


@dataclass(frozen=True)
class Member:
    """A Ray worker that answered: where its ComfyUI listens."""
    id: str
    host: str
    port: int
    gpus: tuple[str, ...]
    pid: int
    node: str

    def worker(self) -> Worker:
        return Worker(id=self.id, name=f"{self.id} on {self.host}", host=self.host, port=self.port, device=None,
                      enabled=True)


def missing_ray() -> str:
    """Why Ray cannot be used from this Python, or ""."""
    try:
        import ray  # noqa: F401 - only whether it imports
    except ImportError:
        return f"the config names a Ray cluster, but Ray is not installed in this ComfyUI's Python: run {INSTALL}"
    return ""


def _actor_class():
    """The actor, made here so that Ray sends it by value, with all it uses: this package is no
    module that a Ray worker process could import by name."""
    import ray
    worker_env = WORKER_ENV

    def die_with_parent() -> None:
        """In the ComfyUI child: end with the actor (Linux), so that no ComfyUI outlives it."""
        try:
            import ctypes
            import signal
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    class ComfyWorker:
        def __init__(self, comfy_folder: str, extra_args: str):
            import socket
            import subprocess
            import sys
            import tempfile
            with socket.socket() as probe:
                probe.bind(("", 0))
                self.port = probe.getsockname()[1]
            argv = [sys.executable, "main.py", "--listen", "0.0.0.0", "--port", str(self.port),
                    *shlex.split(extra_args)]
            env = {**os.environ, worker_env: "1"}
            self.log_path = os.path.join(tempfile.gettempdir(), f"comfyui-distributed-ray-{self.port}.log")
            self.stopping = False
            with open(self.log_path, "ab") as log_file:
                self.process = subprocess.Popen(argv, cwd=comfy_folder, env=env, stdout=log_file,
                                                stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
            threading.Thread(target=self._exit_with_comfyui, daemon=True).start()

        def _exit_with_comfyui(self) -> None:
            self.process.wait()
            if not self.stopping:
                os._exit(1)  # Ray starts the actor again, and with it a new ComfyUI

        def where(self) -> dict:
            return {"host": ray.util.get_node_ip_address(), "port": self.port, "pid": self.process.pid,
                    "gpus": [str(g) for g in ray.get_gpu_ids()], "node": ray.get_runtime_context().get_node_id(),
                    "alive": self.process.poll() is None, "log": self.log_path}

        def stop(self) -> None:
            self.stopping = True
            self.process.terminate()
            try:
                self.process.wait(20)
            except Exception:  # noqa: BLE001 - it would not stop: make it
                self.process.kill()

    return ray.remote(ComfyWorker)


class RayWorkers:
    """The master's Ray workers: connected, kept at the wanted count, and listed (``members``)."""

    def __init__(self, settings_of: Callable[[], RaySettings | None], comfy_folder: Callable[[], str]):
        self.settings_of = settings_of
        self.comfy_folder = comfy_folder
        self.members: dict[str, Member] = {}
        self.error = ""       # why there are no Ray workers now ("" when fine)
        self.wanted = 0
        self.causes: dict[str, str] = {}  # why an actor did not answer, by id
        self._connected_to: str | None = None
        self._actor = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- for the fleet ------------------------------------------------------------------------------
    def merged(self, loaded: Loaded) -> Loaded:
        """The config with the Ray workers that answered after its own workers."""
        if loaded.config.ray is None or not self.members:
            return loaded
        own = {w.id for w in loaded.config.workers}
        extra = [m.worker() for k, m in sorted(self.members.items(), key=lambda kv: _number(kv[0])) if k not in own]
        return dataclasses.replace(loaded, config=dataclasses.replace(loaded.config,
                                                                      workers=loaded.config.workers + extra))

    def view(self) -> dict:
        """What the panel shows: the cluster, how many workers are wanted and which answered."""
        settings = self.settings_of()
        return {"configured": settings is not None, "address": settings.address if settings else "",
                "wanted": self.wanted, "error": self.error,
                "workers": [{"id": m.id, "host": m.host, "port": m.port, "gpus": list(m.gpus), "node": m.node,
                             "pid": m.pid} for _k, m in sorted(self.members.items(), key=lambda kv: _number(kv[0]))]}

    # --- the background thread -------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None and not os.environ.get(WORKER_ENV):
            self._thread = threading.Thread(target=self._run, name="distributed-ray", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - the master goes on with its configured workers
                self.members, self.error = {}, f"the Ray cluster failed to answer: {type(exc).__name__}: {exc}"
                log.warning("[Distributed] %s", self.error)
            self._stop.wait(POLL_SECONDS)

    def tick(self) -> None:
        """Connect, keep the wanted number of actors, and read where each one is."""
        settings = self.settings_of()
        if settings is None:
            self.members, self.error, self.wanted = {}, "", 0
            return
        problem = missing_ray()
        if problem:
            self.members, self.error = {}, problem
            return
        import ray
        if self._connected_to != settings.address:
            if ray.is_initialized():
                ray.shutdown()
            unreachable = _unreachable(settings.address)  # ray.init would wait minutes for nobody
            if unreachable:
                self._connected_to, self.members = None, {}
                self.error = (f"cannot reach the Ray cluster at {settings.address} ({unreachable}); check "
                              "ray.address, and that `ray status` works on this machine. The master goes on "
                              "with its configured workers")
                return
            try:
                ray.init(address=settings.address, namespace=NAMESPACE, logging_level=logging.WARNING,
                         log_to_driver=False, ignore_reinit_error=True)
            except Exception as exc:  # noqa: BLE001 - ConnectionError, RuntimeError, ValueError by version
                self._connected_to, self.members = None, {}
                self.error = (f"cannot reach the Ray cluster at {settings.address} ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); check ray.address, and that "
                              "`ray status` works on this machine. The master goes on with its configured workers")
                return
            self._connected_to, self._actor = settings.address, _actor_class()
        gpus = int(ray.cluster_resources().get("GPU", 0))
        self.wanted = settings.workers or gpus
        names = {n["name"] if isinstance(n, dict) else n for n in ray.util.list_named_actors()}
        ours = {n for n in names if n.startswith(RAY_ID_PREFIX)}
        for k in range(1, self.wanted + 1):
            name = f"{RAY_ID_PREFIX}{k}"
            if name not in ours:
                self._actor.options(name=name, namespace=NAMESPACE, lifetime="detached", num_gpus=1,
                                    max_restarts=-1, max_task_retries=0, get_if_exists=True).remote(
                    settings.comfyui or self.comfy_folder(), settings.extra_args)
                log.info("[Distributed] Ray worker %s asked for", name)
        for name in sorted(ours - {f"{RAY_ID_PREFIX}{k}" for k in range(1, self.wanted + 1)}):
            self._retire(name)
        answers = self._where([f"{RAY_ID_PREFIX}{k}" for k in range(1, self.wanted + 1)])
        self.members = answers
        waiting = self.wanted - len(answers)
        cause = next(iter(self.causes.values()), "")
        self.error = "" if not waiting else (
            f"{waiting} of {self.wanted} Ray workers not up yet" + (
                f" (the cluster has {gpus} GPU{'s' * (gpus != 1)})" if gpus < self.wanted else "")
            + (f"; the last failure: {cause}" if cause else ""))

    def _where(self, names: list[str]) -> dict[str, Member]:
        import ray
        refs = {}
        for name in names:
            try:
                refs[name] = ray.get_actor(name, namespace=NAMESPACE).where.remote()
            except ValueError:
                continue
        ready, _pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=ANSWER_SECONDS) \
            if refs else ([], [])
        found = {}
        self.causes = {}
        for name, ref in refs.items():
            if ref not in ready:
                continue
            try:
                info = ray.get(ref, timeout=0)
            except Exception as exc:  # noqa: BLE001 - restarting, or gone: not a member this time
                self.causes[name] = " ".join(str(exc).split())[:400]
                continue
            if info.get("alive"):
                found[name] = Member(name, str(info["host"]), int(info["port"]), tuple(info["gpus"]),
                                     int(info["pid"]), str(info["node"]))
        return found

    def _retire(self, name: str) -> None:
        """Scale down: stop that actor's ComfyUI, then the actor, for good."""
        import ray
        try:
            actor = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return
        try:
            ray.get(actor.stop.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - killing the actor ends its ComfyUI too (it dies with it)
            pass
        ray.kill(actor, no_restart=True)
        log.info("[Distributed] Ray worker %s retired", name)


def _unreachable(address: str) -> str:
    """Why nothing answers at a host:port or ray://host:port address, or "" (and for "auto")."""
    import socket
    from urllib.parse import urlsplit
    if address == "auto":
        return ""
    try:
        split = urlsplit(address if "://" in address else f"ray://{address}")
        host, port = split.hostname, split.port
    except ValueError:
        return "it is not host:port"
    if not host or not port:
        return "it is not host:port"
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        return f"nothing answers there: {exc.strerror or type(exc).__name__}"
    return ""


def _number(actor_id: str) -> int:
    tail = actor_id[len(RAY_ID_PREFIX):]
    return int(tail) if tail.isdigit() else 0
