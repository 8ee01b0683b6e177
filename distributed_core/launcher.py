"""Start the master and the local workers of gpu_config.json, one ComfyUI per GPU, and stop them together.

``python -m distributed_core.launcher --help`` in the extension folder, or launch_distributed.sh/.bat
(which run this file by its path). Importing it has no side effects: the panel's HTTP routes use
``LocalProcesses``, ``read_log_tail`` and ``log_path``.
"""
from __future__ import annotations

import os
import sys

if not __package__:
    # Run as a file (the wrappers do): embedded Pythons such as ComfyUI portable's ignore the
    # current folder, so ``-m`` cannot find the package there. Before any other import, put the
    # extension folder on the path in place of this one, whose modules must not shadow the stdlib.
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
    __package__ = "distributed_core"

import argparse
import contextlib
import ctypes
import dataclasses
import http.client
import importlib
import json
import re
import shlex
import signal
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import comfy_flags
from . import config as cfg
from . import cpus
from .gpus import config_from_gpus, describe_gpus, detect_bus_ids, detect_gpus

LOG_DIR = cfg.EXTENSION_DIR / "logs"
STATE_DIR = cfg.EXTENSION_DIR / "state"  # each local worker's own database, where its ComfyUI keeps one
MASTER_ID = "master"
STOP_GRACE_S = 10.0
DEFAULT_WAIT_TIMEOUT_S = 180.0
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


def _flag_groups(words: list[str]) -> dict[str, list[str]]:
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
    own = _flag_groups(shlex.split(worker_extra_args))
    return [word for name, group in _flag_groups(master_words).items() if name not in own for word in group]


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
    # Remote workers must reach the master; otherwise nothing outside this machine needs to. Every
    # interface, because ComfyUI before 2025 takes one --listen address and a browser on this machine
    # still uses 127.0.0.1. The extension's routes do not rely on it: a request from another machine
    # needs the secret whatever address it came to (see access.py). ComfyUI's own API is open there.
    listen = "0.0.0.0" if any(not w.is_local for w in config.workers) else "127.0.0.1"
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


def find_comfyui(flag: str | None = None) -> tuple[Path, str]:
    """ComfyUI's folder and how it was found: --comfyui, else the custom_nodes holding us, else $COMFYUI_ROOT."""
    holder = cfg.EXTENSION_DIR.parent
    options = ("Install this extension in ComfyUI/custom_nodes/, set COMFYUI_ROOT to the ComfyUI folder, "
               "or pass --comfyui PATH.")
    for given, how, named_by_user in ((flag, "--comfyui", True),
                                      (holder.parent if holder.name == "custom_nodes" else None,
                                       "the custom_nodes folder holding this extension", False),
                                      (os.environ.get("COMFYUI_ROOT"), "COMFYUI_ROOT", True)):
        root = Path(given).expanduser().resolve() if given else None
        if root and (root / "main.py").is_file():
            return root, how
        if root and named_by_user:  # a wrong folder the user named is an error, not a cue to look elsewhere
            raise LauncherError(f"{how} {given}: no main.py there, so it is not a ComfyUI folder. {options}")
    raise LauncherError(f"Cannot find ComfyUI: this extension is not in a ComfyUI/custom_nodes folder. {options}")


def load_config(flag: str | None = None) -> tuple[cfg.Config, Path, Path | None]:
    """The config, its file, and the file to name to the instances (None: they find the same one).
    With no user config yet, the detected GPUs make one, saved for next time."""
    chosen = flag or os.environ.get(cfg.ENV_VAR)
    path = Path(chosen).expanduser().resolve() if chosen else (cfg.LOCAL_FILE if cfg.LOCAL_FILE.exists() else None)
    named = path if chosen else None  # absolute: the instances run in ComfyUI's folder
    if path is None or not path.exists():
        gpus = detect_gpus()
        print(describe_gpus(gpus))
        config = cfg.parse(config_from_gpus(gpus))
        try:
            saved = cfg.save(config, path or cfg.save_path())
        except OSError as exc:
            raise LauncherError(f"cannot write the detected setup to {path or cfg.save_path()}: {exc}") from exc
        print(f"Wrote the detected setup to {saved} (edit it, or use the panel, to change it).")
        return config, saved, named
    loaded = cfg.load(path)
    if loaded.error:  # unlike the server, never run on defaults the user did not ask for
        raise LauncherError(f"{loaded.error}\nFix the file, or remove it to have a new one detected.")
    return loaded.config, path, named


@dataclass
class Plan:
    comfy_root: Path
    config: cfg.Config
    to_start: list[Instance]
    to_check: list[Instance]  # remote workers, and the master with --workers-only
    master: Instance


def make_plan(args: argparse.Namespace) -> Plan:
    comfy_root, found_by = find_comfyui(args.comfyui)
    config, path, named = load_config(args.config)
    placements = cpu_placements(config, args.cpu)
    master = master_instance(config, sys.executable, args.cpu, named, placements)
    workers = [] if args.master_only else [worker_instance(config, w, sys.executable, args.cpu, named, placements,
                                                           comfy_root=comfy_root)
                                            for w in config.workers if w.enabled]
    to_start = ([] if args.workers_only else [master]) + [w for w in workers if w.local]
    to_check = ([master] if args.workers_only else []) + [w for w in workers if not w.local]
    settings, disabled = config.settings, sum(not w.enabled for w in config.workers)
    print(f"ComfyUI: {comfy_root} (found via {found_by})")
    print(f"Config:  {path} (mode {settings.mode}"
          + (f", {settings.stagger_delay:g} s apart)" if settings.mode == "staggered" else ")"))
    if len(to_start) > 1 and not any(i.cpus for i in to_start):
        print("CPUs:    not pinned (fewer cores than instances, or cpus set to \"off\"); each instance may "
              "use every core")
    print(f"Plan:    start {', '.join(f'{i.label} ({i.gpu})' for i in to_start) or 'nothing'}"
          + (f"; check {', '.join(i.label for i in to_check)}" if to_check else "")
          + (f"; {disabled} disabled worker(s) left off" if disabled else ""))
    return Plan(comfy_root, config, to_start, to_check, master)


def env_words(env: dict[str, str]) -> str:
    return " ".join(f"{name}={shlex.quote(value)}" for name, value in env.items())


def print_dry_run(plan: Plan) -> None:
    print(f"\nDry run: nothing is started. Commands run in {plan.comfy_root}:")
    for instance in plan.to_start:
        named = f", name {instance.label!r}" if instance.label != instance.id else ""
        print(f"\n{instance.id}: {instance.gpu}, port {instance.port}{named}")
        print(f"  cpus: {instance.cpu_text}")
        print(f"  env: {env_words(instance.env)}")
        print(f"  command: {shlex.join(instance.argv)}")
        print(f"  log: {log_path(instance.id)}")
    for instance in plan.to_check:
        print(f"\n{instance.label}: not started here, would be checked at {instance.url}")


def print_table(plan: Plan, status: dict[str, str]) -> None:
    rows = [("NAME", "GPU", "CPUS", "PORT", "URL", "STATUS", "LOG")]
    for instance in plan.to_start + plan.to_check:
        state = status.get(instance.id, "not started")
        ours = instance.local and state not in ("already running", "not started", "online", "offline")
        rows.append((instance.label, instance.gpu, instance.cpu_text, str(instance.port), instance.url, state,
                     str(log_path(instance.id)) if ours else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print("\n" + "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows) + "\n")


class _StopRequest:
    """Set by SIGINT/SIGTERM. A plain flag: taking a lock (threading.Event) in a signal handler can deadlock."""

    def __init__(self) -> None:
        self.requested = False
        self.interrupt = False  # raise KeyboardInterrupt instead, to break out of the example

    def handle(self, signum: int, frame: object) -> None:
        self.requested = True
        if self.interrupt:
            raise KeyboardInterrupt

    def sleep(self, seconds: float) -> bool:
        end = time.monotonic() + seconds
        while not self.requested and (left := end - time.monotonic()) > 0:
            time.sleep(min(0.2, left))
        return self.requested


def _report_failure(instance_id: str, what: str) -> None:
    tail = "\n".join(f"    {line}" for line in read_log_tail(instance_id, 30).splitlines())
    print(f"\nERROR: {what}.\nLast lines of {log_path(instance_id)}:\n{tail}", file=sys.stderr, flush=True)


def start_and_wait(plan: Plan, processes: LocalProcesses, stop: _StopRequest, wait_timeout: float,
                   status: dict[str, str]) -> bool:
    """Start what is not running yet and wait until it answers; False when the master failed."""
    staggered = plan.config.settings.mode == "staggered"
    started: list[Instance] = []
    for instance in plan.to_start:
        if stop.requested:
            break
        if answers(instance.url):  # not ours: neither started nor stopped
            status[instance.id] = "already running"
            print(f"{instance.label} already answers at {instance.url}: left alone")
            continue
        if staggered and started and stop.sleep(plan.config.settings.stagger_delay):
            break
        pid = processes.start(instance, plan.comfy_root)
        status[instance.id] = f"started (pid {pid})"
        started.append(instance)
        print(f"Started {instance.id} (pid {pid}), log {log_path(instance.id)}")
    deadline = time.monotonic() + wait_timeout
    pending = list(started)
    while pending and not stop.requested:
        for instance in list(pending):
            code = processes.exit_code(instance.id)
            if code is not None:
                status[instance.id] = f"exited ({code})"
                _report_failure(instance.id, f"{instance.label} exited with code {code} before answering "
                                             f"on {instance.url}")
            elif answers(instance.url, timeout=1.0):
                status[instance.id] = status[instance.id].replace("started", "running")
                print(f"{instance.id} is up at {instance.url}")
            else:
                continue
            pending.remove(instance)
        if pending and time.monotonic() > deadline:
            for instance in pending:
                status[instance.id] = "no answer, stopped"
                _report_failure(instance.id, f"{instance.label} did not answer on {instance.url} within "
                                             f"{wait_timeout:g} s, so it was stopped (see --wait-timeout)")
            processes.stop([i.id for i in pending])
            pending = []
        stop.sleep(0.5 if pending else 0)
    for instance in plan.to_check:
        status[instance.id] = "online" if answers(instance.url, timeout=3.0) else "offline"
    return all(status[i.id].startswith("running") for i in started if i.id == MASTER_ID)


def watch(processes: LocalProcesses, stop: _StopRequest) -> int:
    """Run until asked to stop; a master that dies takes the workers with it."""
    if not processes.ids():
        print("Nothing was started by this launcher, so there is nothing to watch.")
        return 0
    print("Running. Press Ctrl-C to stop everything this launcher started.", flush=True)
    reported = {i for i in processes.ids() if processes.exit_code(i) is not None}  # told at start-up
    while not stop.sleep(0.5):
        for instance_id in processes.ids():
            code = processes.exit_code(instance_id)
            if code is None or instance_id in reported:
                continue
            reported.add(instance_id)
            if instance_id == MASTER_ID:
                _report_failure(MASTER_ID, f"the master exited (code {code}), so its workers are stopped")
                return 1
            print(f"WARNING: {instance_id} exited (code {code}); see {log_path(instance_id)}", file=sys.stderr)
        if len(reported) == len(processes.ids()):
            print("ERROR: every instance this launcher started has exited.", file=sys.stderr)
            return 1
    return 0


def output_folder(comfy_root: Path, master_words: list[str]) -> Path:
    """Where the master saves images: --output-directory, else <--base-directory>/output, else
    ComfyUI's own output folder (relative paths start at ComfyUI's folder, where instances run)."""
    groups = _flag_groups(master_words)

    def value(flag: str) -> str | None:
        group = groups.get(flag) or []
        return (group[0].partition("=")[2] or None) if group and "=" in group[0] else (group[1] if len(group) > 1
                                                                                      else None)
    folder = value("--output-directory")
    if folder is None:
        base = value("--base-directory")
        folder = str(Path(base) / "output") if base else "output"
    return (Path(comfy_root) / Path(folder).expanduser()).resolve()


def run_example(master_url: str, output_dir: Path | None = None) -> int:
    """Hook for the example run: ``distributed_core.example.run(master_url[, output_dir]) -> int``
    when it exists; ``output_dir`` is where the master saves, so the real paths can be printed."""
    name = f"{__package__}.example"
    try:
        example = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        print("The example is not available in this version (distributed_core/example.py is missing).")
        return 1
    try:
        return int((example.run(master_url, output_dir) if output_dir else example.run(master_url)) or 0)
    except Exception as exc:  # a failed example is a result to report, not a launcher crash
        print(f"ERROR: the example failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launch_distributed", description="Start the ComfyUI master and "
                                     "local workers of gpu_config.json, one per GPU; Ctrl-C stops them.")
    only, add = parser.add_mutually_exclusive_group(), parser.add_argument
    only.add_argument("--master-only", action="store_true", help="start the master only, no workers")
    only.add_argument("--workers-only", action="store_true", help="start the local workers only")
    add("--dry-run", action="store_true", help="print each command and its environment; start nothing")
    add("--cpu", action="store_true", help="run all on the CPU: add --cpu, set no CUDA_VISIBLE_DEVICES")
    add("--config", metavar="PATH", help="config file for the launcher and the master; written from the "
        "detected GPUs when missing (default: gpu_config.local.json)")
    add("--comfyui", metavar="PATH", help="ComfyUI folder, holding main.py (default: the ComfyUI whose "
        "custom_nodes holds this extension, else $COMFYUI_ROOT)")
    add("--wait-timeout", metavar="S", type=float, default=DEFAULT_WAIT_TIMEOUT_S,
        help="seconds to wait for each instance to answer (default %(default)g)")
    add("--example", action="store_true", help="once all answer, run the example workflow on the master, "
        "then stop all and exit with its result")
    args = parser.parse_args(argv)
    if args.wait_timeout <= 0:
        parser.error("--wait-timeout must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        plan = make_plan(args)
    except LauncherError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print_dry_run(plan)
        return 0
    processes, stop, status = LocalProcesses(), _StopRequest(), {}
    signals = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGBREAK] if hasattr(signal, "SIGBREAK") else [])
    previous = {sig: signal.signal(sig, stop.handle) for sig in signals}
    try:
        master_ok = start_and_wait(plan, processes, stop, args.wait_timeout, status)
        print_table(plan, status)
        if stop.requested:
            return 0
        if not master_ok:
            return 1
        if args.example:
            stop.interrupt = True
            return run_example(plan.master.url,
                               output_folder(plan.comfy_root, shlex.split(plan.config.master.extra_args)))
        return watch(processes, stop)
    except LauncherError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # only raised to cut the example short
        return 130
    finally:
        stop.interrupt = False
        if processes.ids():
            print("Stopping the instances this launcher started...", flush=True)
            print(f"Stopped: {', '.join(processes.stop_all())}.", flush=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # progress shows at once, even through a pipe
    sys.exit(main())
