"""Start the master and the local workers of gpu_config.json, one ComfyUI per GPU, and stop them together.

``python -m distributed_core.launcher --help`` in the extension folder, or launch_distributed.sh/.bat
(which run this file by its path). The instances themselves (commands, environments, processes)
are local_instances.py's.
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
import importlib
import shlex
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from . import config as cfg
from .gpus import config_from_gpus, describe_gpus, detect_gpus
from .ray_workers import missing_ray
from .local_instances import (MASTER_ID, Instance, LauncherError, LocalProcesses, answers, cpu_placements,
                              env_words, flag_groups, log_path, master_instance, read_log_tail, worker_instance)

DEFAULT_WAIT_TIMEOUT_S = 180.0


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
    config = with_ray(config, path, args.ray, args.ray_workers)
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
    groups = flag_groups(master_words)

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
    add("--ray", metavar="ADDRESS", help="also use the workers of this Ray cluster (auto, host:port or "
        "ray://host:port), one per GPU: written into the config's ray section (see the README's Ray)")
    add("--ray-workers", metavar="N", type=int, help="with --ray: how many Ray workers (default: one per GPU)")
    add("--example", action="store_true", help="once all answer, run the example workflow on the master, "
        "then stop all and exit with its result")
    args = parser.parse_args(argv)
    if args.wait_timeout <= 0:
        parser.error("--wait-timeout must be positive")
    if args.ray_workers is not None and (args.ray is None or args.ray_workers < 0):
        parser.error("--ray-workers needs --ray, and a number of 0 (one per GPU) or more")
    return args


def with_ray(config: cfg.Config, path: Path, address: str | None, workers: int | None) -> cfg.Config:
    """The config with the ray section that --ray asks for, saved where the master reads it."""
    if address is None:
        return config
    ray = {"address": address, "workers": workers if workers is not None else (config.ray.workers if config.ray else 0)}
    if config.ray and config.ray.comfyui:
        ray["comfyui"] = config.ray.comfyui
    if config.ray and config.ray.extra_args:
        ray["extra_args"] = config.ray.extra_args
    try:
        updated = cfg.parse({**config.to_dict(), "ray": ray})
    except cfg.ConfigError as exc:
        raise LauncherError(f"--ray: {exc}") from None
    problem = missing_ray()
    if problem:
        raise LauncherError(problem)
    cfg.save(updated, path)
    print(f"Ray:     {address}, {ray['workers'] or 'one per GPU'} worker(s), written to {path}")
    return updated


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
