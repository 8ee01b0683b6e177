"""The local ComfyUI instances of a machine: the command, environment and CPU cores of the master
and of each local worker, starting them as processes tied to their parent, their logs, and stopping
them together. The launcher (launcher.py) and the panel's routes (``LocalProcesses``,
``read_log_tail``) both start instances through this module."""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import http.client
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import comfy_flags
from . import config as cfg
from . import cpus
from .gpus import detect_bus_ids

LOG_DIR = cfg.EXTENSION_DIR / "logs"
STATE_DIR = cfg.EXTENSION_DIR / "state"  # each local worker's own database, where its ComfyUI keeps one
MASTER_ID = "master"
STOP_GRACE_S = 10.0
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # as worker ids in the config


class LauncherError(Exception):
    """A problem the user must fix, told in one message."""


def log_path(instance_id: str) -> Path:
    """``<extension>/logs/<id>.log``; ids outside [A-Za-z0-9_-] are refused so no path escapes."""
    if not isinstance(instance_id, str) or not SAFE_ID.fullmatch(instance_id):
        raise ValueError(f"invalid instance id {instance_id[:80]!r}: up to 64 letters, digits, '-' and '_'")
    return LOG_DIR / f"{instance_id}.log"


def read_log_tail(instance_id: str, lines: int = 50) -> str:
    """The last ``lines`` lines of an instance's log; "" when it has none."""
    path = log_path(instance_id)
    lines = max(1, min(int(lines), 10_000))
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - max(65_536, 1_000 * lines)))  # logs of long runs grow large
            data = handle.read()
    except FileNotFoundError:
        return ""
    return "\n".join(data.decode("utf-8", errors="replace").splitlines()[-lines:])


@dataclass
class Instance:
    id: str
    label: str
    port: int
    url: str  # where this machine reaches it
    device: int | None = None
    cpu: bool = False
    local: bool = True
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # set on top of the launcher's own environment
    database: Path | None = None                       # its own database file, made in STATE_DIR
    cpus: list[int] = field(default_factory=list)      # cores it is pinned to; [] for none
    threads: int = 0                                   # its thread pools' size; 0 for ComfyUI's own choice

    @property
    def cpu_text(self) -> str:
        if not self.local:
            return "-"
        pinned = cpus.format_cpulist(self.cpus) if self.cpus else "any"
        return f"{pinned} ({self.threads} thread{'s' if self.threads != 1 else ''})" if self.threads else pinned

    @property
    def gpu(self) -> str:
        if not self.local:
            return "remote"
        return "CPU" if self.cpu else ("default GPU" if self.device is None else f"GPU {self.device}")


def build_command(python: str, listen: str, port: int, extra_args: str = "", cpu: bool = False,
                  inherited: list[str] | None = None) -> list[str]:
    """The one way an instance's command is built: a list of words for exec, never a shell string.

    A bare --enable-cors-header (the original product sheet's default) would open the instance to
    every web origin; the browser only ever talks to the master, so it is dropped."""
    args = shlex.split(extra_args)
    args = [a for i, a in enumerate(args)
            if not (a == "--enable-cors-header" and (i + 1 == len(args) or args[i + 1].startswith("-")))]
    if cpu and "--cpu" not in args:
        args.append("--cpu")
    return [python, "main.py", "--listen", listen, "--port", str(port), *args, *(inherited or [])]


# The master's folders that local workers share unless they name their own: the same models (and
# model paths), the same input files (nothing to upload) and output folder.
FOLDER_FLAGS = ("--extra-model-paths-config", "--base-directory", "--input-directory", "--output-directory")


def flag_groups(words: list[str]) -> dict[str, list[str]]:
    """Each folder flag in ``words`` with its values, as written ("--flag v" or "--flag=v"); a flag
    given twice keeps both (ComfyUI appends --extra-model-paths-config)."""
    groups: dict[str, list[str]] = {}
    i = 0
    while i < len(words):
        name = words[i].partition("=")[0]
        if name in FOLDER_FLAGS:
            group = [words[i]]
            if "=" not in words[i]:
                while i + 1 < len(words) and not words[i + 1].startswith("-"):
                    i += 1
                    group.append(words[i])
            groups.setdefault(name, []).extend(group)
        i += 1
    return groups


def master_folder_args(master_words: list[str], worker_extra_args: str) -> list[str]:
    """The master's folder flags (FOLDER_FLAGS) that a local worker's own extra_args do not set."""
    own = flag_groups(shlex.split(worker_extra_args))
    return [word for name, group in flag_groups(master_words).items() if name not in own for word in group]


def database_path(instance_id: str) -> Path:
    return STATE_DIR / f"{log_path(instance_id).stem}.db"


def storage_args(flags: comfy_flags.ComfyFlags, instance_id: str, own_words: list[str]) -> list[str]:
    """What keeps a local worker off the database of the other instances of its ComfyUI folder.

    ComfyUI 0.38 locks user/comfyui.db at start, and every instance after the first exits with
    ASSETS_STARTUP_FAILED. A worker needs no asset catalogue: --disable-assets where its ComfyUI has
    it, else (0.3.6x) a database of its own; nothing for a ComfyUI with neither (2024), nor when the
    worker's own extra_args already set either."""
    if flags.given(own_words) & {"--disable-assets", "--database-url"}:
        return []
    if flags.declares("--disable-assets"):
        return ["--disable-assets"]
    if flags.declares("--database-url"):
        return ["--database-url", f"sqlite:///{database_path(instance_id).as_posix()}"]
    return []


def instance_env(device: int | None, cpu: bool, config_file: Path | None, threads: int = 0) -> dict[str, str]:
    env = {"PYTHONUNBUFFERED": "1", **(cpus.thread_env(threads) if threads else {})}  # unbuffered: current logs
    if device is not None and not cpu:
        # CUDA numbers GPUs fastest first unless told otherwise; devices here are nvidia-smi's numbers.
        env.update(CUDA_DEVICE_ORDER="PCI_BUS_ID", CUDA_VISIBLE_DEVICES=str(device))
    if config_file is not None:
        env[cfg.ENV_VAR] = str(config_file)
    return env


def _local_url(host: str, port: int) -> str:
    return f"http://[::1]:{port}" if host == "::1" else f"http://127.0.0.1:{port}"


Placements = dict[str, tuple[list[int], int]]  # instance id -> (CPU cores, threads)


def cpu_placements(config: cfg.Config, cpu_only: bool = False, machine: cpus.Machine | None = None) -> Placements:
    """The CPU cores and pool size of every local instance of the config, enabled or not, so that
    a worker started later from the panel gets the same cores as the launcher would give it.
    Entries with their own ``cpus`` keep them, and the others share what is left (see cpus.py)."""
    if machine is None:
        machine = cpus.probe({} if cpu_only else detect_bus_ids())
    entries = [(MASTER_ID, config.master)] + [(w.id, w) for w in config.workers if w.is_local]
    fixed = {i: cpus.parse_cpulist(e.cpus) for i, e in entries if e.cpus not in ("", cpus.OFF)}
    taken = {cpu for chosen in fixed.values() for cpu in chosen}
    rest = dataclasses.replace(machine, cpus=tuple(c for c in machine.cpus if c not in taken))
    automatic = cpus.allocate([(i, None if cpu_only else e.device) for i, e in entries if not e.cpus], rest)
    result: Placements = {}
    for instance_id, entry in entries:
        chosen = fixed.get(instance_id) or automatic.get(instance_id) or []
        result[instance_id] = (chosen, entry.threads or (cpus.threads_for(chosen, machine) if chosen else 0))
    return result


def master_instance(config: cfg.Config, python: str, cpu: bool = False, config_file: Path | None = None,
                    placements: Placements | None = None) -> Instance:
    # Loopback only: no worker ever connects to the master (the master opens every connection,
    # relay.py), so nothing outside this machine needs to reach it. A --listen of the user's own in
    # master.extra_args comes later on the command line, and wins.
    listen = "127.0.0.1"
    port, device = config.master.port, config.master.device
    cpu = cpu or "--cpu" in shlex.split(config.master.extra_args)
    pinned, threads = (placements or {}).get(MASTER_ID, ([], 0))
    return Instance(MASTER_ID, "master", port, _local_url("127.0.0.1", port), device, cpu,
                    argv=build_command(python, listen, port, config.master.extra_args, cpu),
                    env=instance_env(device, cpu, config_file, threads), cpus=pinned, threads=threads)


def worker_instance(config: cfg.Config, worker: cfg.Worker, python: str, cpu: bool = False,
                    config_file: Path | None = None, placements: Placements | None = None,
                    master_args: list[str] | None = None, comfy_root: Path | None = None) -> Instance:
    """``master_args``: the running master's own ComfyUI arguments, when it starts the worker; their
    folder flags count as well as those of master.extra_args (see FOLDER_FLAGS). ``comfy_root``: the
    ComfyUI folder it runs, whose flags decide its storage_args (none without it)."""
    if not worker.is_local:
        return Instance(worker.id, worker.label, worker.port, worker.url, worker.device, local=False)
    own_words = shlex.split(worker.extra_args)
    cpu = cpu or "--cpu" in own_words
    listen = "::1" if worker.host == "::1" else "127.0.0.1"
    pinned, threads = (placements or {}).get(worker.id, ([], 0))
    master_words = shlex.split(config.master.extra_args) + list(master_args or [])
    storage = storage_args(comfy_flags.read(comfy_root), worker.id, own_words) if comfy_root else []
    inherited = master_folder_args(master_words, worker.extra_args) + storage
    return Instance(worker.id, worker.label, worker.port, _local_url(worker.host, worker.port), worker.device,
                    cpu, argv=build_command(python, listen, worker.port, worker.extra_args, cpu, inherited),
                    env=instance_env(worker.device, cpu, config_file, threads), cpus=pinned, threads=threads,
                    database=database_path(worker.id) if "--database-url" in storage else None)


def answers(url: str, timeout: float = 2.0) -> bool:
    """True when a ComfyUI answers ``GET /system_stats`` at ``url``."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    try:
        with opener.open(f"{url}/system_stats", timeout=timeout) as response:
            return response.status == 200 and isinstance(json.loads(response.read()), dict)
    except (OSError, ValueError, http.client.HTTPException):
        return False


def _child_setup(pinned: list[int]) -> Callable[[], None] | None:
    """On Linux, a preexec_fn that pins the child to its cores and has the kernel kill it when its
    parent dies, even by SIGKILL."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in the forked child
    except (OSError, AttributeError):
        prctl = None
    parent_pid = os.getpid()

    def setup() -> None:
        if pinned:
            os.sched_setaffinity(0, pinned)
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
            if os.getppid() != parent_pid:  # the parent died before prctl took effect
                os._exit(1)

    return setup


def _pin_windows_process(process: subprocess.Popen, pinned: list[int]) -> None:
    """Windows has no preexec_fn: set the new process's affinity mask (CPUs 0 to 63) through Win32."""
    mask = sum(1 << cpu for cpu in pinned if cpu < 64)
    if os.name != "nt" or not mask:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.windll.kernel32.SetProcessAffinityMask(int(process._handle), ctypes.c_size_t(mask))


def _signal_group(process: subprocess.Popen, hard: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.name == "nt":
            process.kill() if hard else process.terminate()
        else:  # each child leads its own session, so its group id is its pid
            os.killpg(process.pid, signal.SIGKILL if hard else signal.SIGTERM)


def stop_processes(processes: list[subprocess.Popen], grace_s: float = STOP_GRACE_S) -> None:
    """Terminate all at once (each with its process group), wait up to ``grace_s``, then kill what is left."""
    # Only those still running: the pid of one that ended earlier may belong to someone else by now.
    running = [process for process in processes if process.poll() is None]
    for process in running:
        _signal_group(process, hard=False)
    deadline = time.monotonic() + grace_s
    for process in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(max(0.0, deadline - time.monotonic()))
    for process in running:
        if process.poll() is None:
            _signal_group(process, hard=True)
            process.wait()


class LocalProcesses:
    """ComfyUI instances started by this process, by id; it never touches others.

    On Linux a child is killed when the thread that started it ends (PR_SET_PDEATHSIG is per
    thread), so start from a thread that lives as long as the process, e.g. the event loop's.
    """

    def __init__(self) -> None:
        self._by_id: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def start(self, instance: Instance, comfy_root: Path) -> int:
        if not instance.local:
            raise LauncherError(f"{instance.label} is on another machine ({instance.url}); start it there")
        path = log_path(instance.id)
        for folder in {path.parent, *([instance.database.parent] if instance.database else [])}:
            folder.mkdir(parents=True, exist_ok=True)
        options: dict = ({"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt"
                         else {"start_new_session": True, "preexec_fn": _child_setup(instance.cpus)})
        with self._lock:
            running = self._by_id.get(instance.id)
            if running is not None and running.poll() is None:
                raise LauncherError(f"{instance.label} is already running (pid {running.pid})")
            try:
                with path.open("wb") as log:
                    log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} in {comfy_root}: "
                              f"{env_words(instance.env)} {shlex.join(instance.argv)}\n".encode())
                    log.flush()
                    process = subprocess.Popen(instance.argv, cwd=comfy_root, env={**os.environ, **instance.env},
                                               stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                               **options)
            except OSError as exc:
                raise LauncherError(f"cannot start {instance.label}: {exc}") from exc
            _pin_windows_process(process, instance.cpus)
            self._by_id[instance.id] = process
            return process.pid

    def start_worker(self, config: cfg.Config, worker: cfg.Worker, comfy_root: Path,
                     python: str = sys.executable, cpu: bool = False, config_file: Path | None = None,
                     placements: Placements | None = None, master_args: list[str] | None = None) -> int:
        """Start one local worker exactly as the launcher would (on the cores ``cpu_placements``
        gives it, with the master's folders); returns its pid."""
        return self.start(worker_instance(config, worker, python, cpu, config_file, placements, master_args,
                                          Path(comfy_root)), Path(comfy_root))

    def process(self, instance_id: str) -> subprocess.Popen | None:
        with self._lock:
            return self._by_id.get(instance_id)

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._by_id)

    def exit_code(self, instance_id: str) -> int | None:
        """None while running (or never started here), else how it ended."""
        process = self.process(instance_id)
        return None if process is None else process.poll()

    def is_running(self, instance_id: str) -> bool:
        return self.process(instance_id) is not None and self.exit_code(instance_id) is None

    def stop(self, instance_ids: list[str], grace_s: float = STOP_GRACE_S) -> list[str]:
        """Stop these instances (among those this object started); returns the ids it stopped."""
        with self._lock:
            chosen = {i: self._by_id.pop(i) for i in instance_ids if i in self._by_id}
        stop_processes(list(chosen.values()), grace_s)
        return list(chosen)

    def stop_worker(self, worker_id: str, grace_s: float = STOP_GRACE_S) -> bool:
        return bool(self.stop([worker_id], grace_s))

    def stop_all(self, grace_s: float = STOP_GRACE_S) -> list[str]:
        return self.stop(self.ids(), grace_s)


def env_words(env: dict[str, str]) -> str:
    return " ".join(f"{name}={shlex.quote(value)}" for name, value in env.items())
