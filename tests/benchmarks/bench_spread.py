"""The spread queue on N GPUs: throughput of a queue of independent prompts, and each GPU's idle time.

    COMFYUI_ROOT=<ComfyUI folder> python tests/benchmarks/bench_spread.py [--gpus N] [--prompts 40]
        [--size 512] [--steps 20] [--mixed 10,40] [--runs 3] [--checkpoint PATH] [--out FILE]
    (on a machine without GPUs: --cpu --size 64 --steps 2 --prompts 8, to check the script itself)

One ComfyUI per GPU (CUDA_VISIBLE_DEVICES per instance, each on its own share of the cores, as the
launcher places them), the first the master, with `settings.spread_queue` on. An SD1.5-shaped model
with random weights (nothing downloaded), euler, batch 1, every prompt its own seed. In one run:
- ``--prompts`` prompts queued at once by an API client on the master alone (the workers disabled),
  then the same prompts on all N: throughput (prompts/s, first POST to last finished) and the ratio;
- "by hand": the same number of prompts dealt out in turn to every instance's own queue, nothing
  spread: what this machine gives N independent instances, the ceiling for the spread queue;
- prompts of mixed cost (steps alternating as ``--mixed`` says) on all N: each instance's idle time
  while a prompt waits that nobody has started, sampled every 50 ms from each instance's queue and
  the master's spread claims.
Prints the figures and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distributed_core import config as config_file  # noqa: E402
from distributed_core import cpus, launcher  # noqa: E402
from harness import (Instance, bare_frontend, build_checkpoint, emit, error_of, free_port, has_flag,  # noqa: E402
                     latent, link_checkpoint, prepare_tree, txt2img, write_config)

SEEDS = itertools.count(1)
SAMPLE_SECONDS = 0.05


def prompt(size: int, steps: int) -> dict:
    """txt2img without a Collector: the sampler's images straight into SaveImage."""
    p = txt2img(latent("plain", size, 1), steps, seed=next(SEEDS))
    del p["7"]
    p["8"]["inputs"]["images"] = ["6", 0]
    return p


def config_for(instances: list[Instance], enabled: int) -> dict:
    return {"master": {"port": instances[0].port, "device": 0, "enabled": True},
            "workers": [{"id": f"gpu{i}", "port": inst.port, "device": i, "enabled": i < enabled}
                        for i, inst in enumerate(instances[1:], start=1)],
            "settings": {"stagger_delay": 0, "job_timeout": 600, "mode": "parallel", "spread_queue": True}}


def start(workdir: Path, tree: Path, gpus: int, cpu: bool, env: dict) -> list[Instance]:
    ports = [free_port() for _ in range(gpus)]
    write_config(Path(env[config_file.ENV_VAR]), config_for_ports(ports))
    parsed = config_file.load(Path(env[config_file.ENV_VAR])).config
    placements = launcher.cpu_placements(parsed, cpu)
    ids = [launcher.MASTER_ID] + [w.id for w in parsed.workers]
    extra = (["--front-end-root", str(bare_frontend(tree))] if has_flag(tree, "--front-end-root") else [])
    instances = []
    for n, (instance_id, port) in enumerate(zip(ids, ports)):
        pinned, threads = placements.get(instance_id, ([], 0))
        instance_env = {**env, **({} if cpu else {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": str(n)}),
                        **(cpus.thread_env(threads) if threads else {})}
        prefix = ["taskset", "-c", cpus.format_cpulist(pinned)] if pinned and shutil.which("taskset") else []
        instances.append(Instance(tree, "master" if n == 0 else f"gpu{n}", port, workdir, instance_env,
                                  extra_args=extra, cpu=cpu, prefix=prefix).start())
    for instance in instances:
        instance.wait_ready(600)
    return instances


def config_for_ports(ports: list[int]) -> dict:
    return {"master": {"port": ports[0], "device": 0, "enabled": True},
            "workers": [{"id": f"gpu{i}", "port": p, "device": i} for i, p in enumerate(ports[1:], start=1)],
            "settings": {"stagger_delay": 0, "job_timeout": 600, "spread_queue": True}}


class IdleMeter:
    """Samples every instance's queue and the master's spread claims; adds up, per instance, the
    time it ran nothing while some queued prompt had not been started by anyone."""

    def __init__(self, instances: list[Instance]):
        self.instances = instances
        self.idle = {i.name: 0.0 for i in instances}
        self.waiting_time = 0.0
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        master = self.instances[0]
        last = time.monotonic()
        while not self.stop_event.is_set():
            time.sleep(SAMPLE_SECONDS)
            try:
                queue = master.get("/queue").json()
                claimed = {c["prompt_id"] for c in master.get("/distributed/spread").json()["prompts"]}
                waiting = [item for item in queue["queue_pending"] if item[1] not in claimed]
                running = {i.name: bool(i.get("/queue").json()["queue_running"]) for i in self.instances}
            except Exception:  # noqa: BLE001 - a missed sample
                continue
            now = time.monotonic()
            step, last = now - last, now
            if waiting:
                self.waiting_time += step
                for name, busy in running.items():
                    if not busy:
                        self.idle[name] += step

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.thread.join(5)


def run_queue(master: Instance, prompts: list[dict]) -> float:
    """Queue every prompt at once; seconds from the first POST until the last one finished."""
    started = time.perf_counter()
    ids = [master.queue_prompt(p) for p in prompts]
    for pid in ids:
        entry = master.wait_prompt(pid, 3600)
        if error_of(entry):
            raise RuntimeError(f"prompt {pid} failed: {error_of(entry)}")
    return time.perf_counter() - started


def run_by_hand(instances: list[Instance], prompts: list[dict]) -> float:
    """The same prompts dealt out in turn to every instance's own queue at once, with nothing
    spread: the best a user gets by hand on this machine. Seconds until the last one finished."""
    started = time.perf_counter()
    ids = [(instances[k % len(instances)], instances[k % len(instances)].queue_prompt(p))
           for k, p in enumerate(prompts)]
    for instance, pid in ids:
        entry = instance.wait_prompt(pid, 3600)
        if error_of(entry):
            raise RuntimeError(f"prompt {pid} failed on {instance.name}: {error_of(entry)}")
    return time.perf_counter() - started


def busy(instances: list[Instance], since: float, until: float) -> dict:
    """Per instance, from its history's execution timestamps (ComfyUI from mid-2024): how many
    prompts it ran between two wall-clock times, and for how many seconds."""
    found = {}
    for inst in instances:
        count, seconds = 0, 0.0
        for entry in inst.get("/history?max_items=10000", timeout=30).json().values():
            stamps = {m[0]: m[1].get("timestamp", 0) / 1000.0 for m in (entry.get("status") or {}).get("messages", [])
                      if isinstance(m, list) and len(m) == 2 and isinstance(m[1], dict)}
            start, end = stamps.get("execution_start"), stamps.get("execution_success")
            if start and end and since <= start and end <= until:
                count, seconds = count + 1, seconds + (end - start)
        found[inst.name] = {"prompts": count, "busy_s": round(seconds, 3), "idle_s": round(until - since - seconds, 3)}
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--mixed", default="10,40",
                        help="steps of the mixed-cost prompts, alternating ('none' skips that part)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each (alternating; the median counts)")
    parser.add_argument("--no-hand", action="store_true",
                        help="skip the by-hand run (the prompts dealt out to every instance's own queue)")
    parser.add_argument("--cpu", action="store_true", help="CPU instances (to check the script)")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    mixed = [] if args.mixed == "none" else [int(s) for s in args.mixed.split(",")]
    figures: dict = {"bench": "spread", "date": time.strftime("%Y-%m-%d"), "gpus": args.gpus, "size": args.size,
                     "steps": args.steps, "prompts": args.prompts, "cpu": args.cpu}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", config_file.ENV_VAR: str(workdir / "gpu_config.json"),
               "COMFYUI_DISTRIBUTED_SECRET_FILE": str(workdir / "secret.key")}
        tree = prepare_tree(workdir / "comfyui")
        cached = Path.home() / ".cache" / "comfyui-distributed" / "sd15-random.safetensors"
        checkpoint = build_checkpoint(tree, args.checkpoint or (cached if cached.exists() else workdir / "sd15.safetensors"))
        link_checkpoint(tree, checkpoint)
        instances = start(workdir, tree, args.gpus, args.cpu, env)
        master = instances[0]
        config_path = Path(env[config_file.ENV_VAR])
        try:
            for inst in instances:  # load the model everywhere before timing
                inst.timed(prompt(args.size, args.steps))
            ones, manys, hands, spans = [], [], [], []
            for run in range(args.runs):  # alternating, so drift on the machine touches all alike
                write_config(config_path, config_for(instances, 1))
                ones.append(run_queue(master, [prompt(args.size, args.steps) for _ in range(args.prompts)]))
                if not args.no_hand:
                    hands.append(run_by_hand(instances, [prompt(args.size, args.steps) for _ in range(args.prompts)]))
                write_config(config_path, config_for(instances, args.gpus))
                since = time.time()
                manys.append(run_queue(master, [prompt(args.size, args.steps) for _ in range(args.prompts)]))
                spans.append(busy(instances, since, time.time()))
                print(f"run {run + 1}: 1 GPU {ones[-1]:.2f} s, {args.gpus} GPUs {manys[-1]:.2f} s"
                      + (f", by hand on {args.gpus} {hands[-1]:.2f} s" if hands else "")
                      + f"; who ran what on {args.gpus}: {spans[-1]}", flush=True)
            one, many = statistics.median(ones), statistics.median(manys)
            figures.update({"one_gpu_s": one, "n_gpu_s": many, "one_gpu_prompts_per_s": args.prompts / one,
                            "n_gpu_prompts_per_s": args.prompts / many, "ratio": one / many,
                            "one_gpu_runs": ones, "n_gpu_runs": manys, "n_gpu_busy": spans,
                            "pair_ratios": [o / m for o, m in zip(ones, manys)]})
            print(f"{args.prompts} prompts at {args.size}x{args.size}, {args.steps} steps (median of {args.runs}): "
                  f"1 GPU {one:.1f} s ({args.prompts / one:.2f}/s), {args.gpus} GPUs {many:.1f} s "
                  f"({args.prompts / many:.2f}/s): ratio {one / many:.2f} (each run: "
                  + ", ".join(f"{o / m:.2f}" for o, m in zip(ones, manys)) + ")", flush=True)
            if hands:
                hand = statistics.median(hands)
                figures.update({"by_hand_s": hand, "by_hand_runs": hands, "by_hand_ratio": one / hand,
                                "spread_over_by_hand": hand / many})
                print(f"by hand on {args.gpus} (the prompts dealt out to each instance's own queue): {hand:.1f} s, "
                      f"ratio {one / hand:.2f} over 1 GPU (each run: "
                      + ", ".join(f"{o / h:.2f}" for o, h in zip(ones, hands))
                      + f"); spread throughput / by hand {hand / many:.3f}", flush=True)
            if mixed:
                with IdleMeter(instances) as meter:
                    mixed_s = run_queue(master, [prompt(args.size, mixed[k % len(mixed)])
                                                 for k in range(args.prompts)])
                figures.update({"mixed_steps": mixed, "mixed_s": mixed_s, "waiting_s": meter.waiting_time,
                                "idle_while_waiting_s": meter.idle})
                print(f"mixed cost ({'/'.join(map(str, mixed))} steps): {mixed_s:.1f} s; prompts waited "
                      f"unstarted for {meter.waiting_time:.1f} s; idle meanwhile: "
                      + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in meter.idle.items()), flush=True)
        finally:
            for inst in instances:
                inst.stop()
    emit(figures, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
