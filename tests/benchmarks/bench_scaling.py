"""Scaling across real GPUs, against one instance and against plain instances run by hand.

    COMFYUI_ROOT=<ComfyUI folder> python tests/benchmarks/bench_scaling.py [--checkpoint PATH] [--runs 5]
        [--sizes 512:4,1024:2] [--extension PATH] [--no-hand] [--profile] [--out FILE]

The launcher of the extension under test detects the GPUs and starts one ComfyUI per GPU (with its CPU
split). Beside them, the benchmark starts one plain ComfyUI per GPU, without the extension, on the same
GPU and the same cores: what a user gets without this extension. With an SD1.5-shaped model (random
weights, nothing downloaded), 20 steps, euler, for each size (WIDTH:images per GPU) and each GPU count
N the machine has (1, 2, 4, 8), it measures in one run:
- one plain instance rendering its batch (the base of "ideal": N times its images/s);
- N plain instances, each given its own batch at the same moment ("by hand");
- ours, multiply mode (each GPU renders the batch with its own seed) and split mode (one batch of
  N x the images, divided by index).
Efficiency = images/s over ideal, and over the hand-run instances. It also prints how long the master's
own prompt ran (ComfyUI's history timestamps) against a plain prompt of one batch: the master's extra
work after the Collector shows there. --profile samples the master with py-spy (if installed) during
multiply runs at the most GPUs and prints where its execution thread spends its busy time.
--extension benchmarks another copy of the extension (an older version, for before/after figures).
Prints a table and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import itertools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distributed_core import config as config_file  # noqa: E402
from distributed_core import cpus, launcher  # noqa: E402
from harness import (EXTENSION_NAME, REPO, Instance, bare_frontend, build_checkpoint, emit, free_port,  # noqa: E402
                     has_flag, latent, link_checkpoint, prepare_tree, txt2img, write_config)

STEPS = 20
SAVE_NODE = "8"
SEEDS = itertools.count(1)  # every prompt its own seed: ComfyUI's cache must never serve a timed run


def seeded(prompt: dict, seed: int) -> dict:
    """Route the sampler's seed through a Distributed Seed, so every GPU draws its own images."""
    prompt = json.loads(json.dumps(prompt))
    prompt["9"] = {"class_type": "DistributedSeed", "inputs": {"seed": seed}}
    prompt["5"]["inputs"]["seed"] = ["9", 0]
    return prompt


def plain(prompt: dict) -> dict:
    """The same workflow without the Collector, for ComfyUI without the extension."""
    prompt = json.loads(json.dumps(prompt))
    del prompt["7"]
    prompt[SAVE_NODE]["inputs"]["images"] = ["6", 0]
    return prompt


def span(entry: dict) -> float | None:
    """Seconds the prompt ran, from its history's execution timestamps (ComfyUI from mid-2024)."""
    stamps = {event: data.get("timestamp") for event, data in entry.get("status", {}).get("messages", [])
              if isinstance(data, dict)}
    start, end = stamps.get("execution_start"), stamps.get("execution_success")
    return (end - start) / 1000 if isinstance(start, (int, float)) and isinstance(end, (int, float)) else None


def measure(run, runs: int) -> tuple[float, list[float], list[float]]:
    """Warm up once, then time ``runs`` runs; returns (median seconds, all seconds, prompt spans)."""
    run(0)
    seconds, spans = [], []
    for k in range(1, runs + 1):
        took, entry = run(k)
        seconds.append(took)
        if entry is not None and span(entry) is not None:
            spans.append(span(entry))
    return statistics.median(seconds), seconds, spans


def all_at_once(instances: list[Instance], make) -> tuple[float, None]:
    """Each instance gets its own prompt at the same moment; seconds until the last is done."""
    errors: list[BaseException] = []

    def one(instance: Instance, k: int) -> None:
        try:
            instance.timed(make(k))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    started = time.perf_counter()
    threads = [threading.Thread(target=one, args=(instance, k)) for k, instance in enumerate(instances)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started, None


# --- profile of the master --------------------------------------------------------------------------

CATEGORIES = [  # the first that a stack (leaf last) matches, searched from the leaf
    ("PNG encoding (SaveImage)", ("PngImagePlugin", "save_images", "ImageFile.py", "distributed-png")),
    ("Collector: assembly and waiting", ("_gather", "put_local", "jobs.py")),
    ("VAE decode", ("decode (comfy/sd.py", "decode_tiled", "VAEDecode")),
    ("sampling", ("sample (comfy/samplers.py", "k_diffusion", "samplers.py", "sampling.py")),
    ("text encoding", ("sd1_clip", "CLIPTextEncode", "encode_from_tokens")),
]


def categorize(collapsed: str) -> dict[str, dict[str, int]]:
    """py-spy's raw (collapsed) stacks -> samples per category, for the execution thread and for
    the rest of the process (the event loop's receive path and the encoder threads)."""
    result = {"execution thread": collections.Counter(), "other threads": collections.Counter()}
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        where = "execution thread" if "prompt_worker" in stack else "other threads"
        category = next((name for name, marks in CATEGORIES if any(m in stack for m in marks)), "other")
        if where == "other threads" and ("run_forever" in stack or "aiohttp" in stack):
            category = "event loop (receiving results, HTTP)"
        result[where][category] += int(count)
    return {k: dict(v) for k, v in result.items()}


class Profiler:
    def __init__(self, pid: int, out: Path):
        self.out = out
        self.process = subprocess.Popen([shutil.which("py-spy"), "record", "--pid", str(pid), "--rate", "200",
                                         "--format", "raw", "--threads", "--nonblocking", "--output", str(out)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        time.sleep(2)

    def stop(self) -> dict:
        self.process.send_signal(signal.SIGINT)
        self.process.wait(60)
        return categorize(self.out.read_text()) if self.out.exists() else {}


# --- instances ----------------------------------------------------------------------------------------

def start_ours(workdir: Path, tree: Path, extension: Path, env: dict) -> tuple[subprocess.Popen, dict, int, Path]:
    """The extension's own launcher: detect the GPUs, write the config, start one instance per GPU."""
    config_path = workdir / "gpu_config.json"
    script = extension / "distributed_core" / "launcher.py"
    command = [sys.executable, str(script), "--config", str(config_path), "--comfyui", str(tree)]
    subprocess.run([*command, "--dry-run"], env=env, check=True)
    detected = json.loads(config_path.read_text())
    if has_flag(tree, "--front-end-root") and importlib.util.find_spec("comfyui_frontend_package") is None:
        for instance in (detected["master"], *detected["workers"]):  # headless: a bare page, no frontend
            instance["extra_args"] = f"{instance.get('extra_args', '')} --front-end-root {bare_frontend(tree)}".strip()
    write_config(config_path, detected)
    log = workdir / "launcher.log"
    process = subprocess.Popen([*command, "--wait-timeout", "600"], env=env, stdout=log.open("w"),
                               stderr=subprocess.STDOUT)
    master = Instance(tree, "master", detected["master"]["port"], workdir, env)
    deadline = time.monotonic() + 900
    while True:
        try:
            states = [i["state"] for i in master.get("/distributed/status").json()["instances"]]
            if all(s == "online" for s in states):
                break
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the launcher did not bring every instance up:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    print(log.read_text().strip(), flush=True)
    pid = int(re.search(r"^Started master \(pid (\d+)\)", log.read_text(), re.M).group(1))
    return process, detected, pid, config_path


def start_plain(workdir: Path, tree: Path, config: dict, env: dict) -> list[Instance]:
    """One ComfyUI without the extension per GPU, on the cores our launcher gives that GPU's instance."""
    parsed = config_file.parse(config)
    placements = launcher.cpu_placements(parsed)
    ids = [launcher.MASTER_ID] + [w.id for w in parsed.workers]
    devices = [parsed.master.device] + [w.device for w in parsed.workers]
    instances = []
    for n, (instance_id, device) in enumerate(zip(ids, devices)):
        pinned, threads = placements.get(instance_id, ([], 0))
        instance_env = {**env, "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": str(device),
                        **(cpus.thread_env(threads) if threads else {})}
        prefix = ["taskset", "-c", cpus.format_cpulist(pinned)] if pinned and shutil.which("taskset") else []
        extra = (["--front-end-root", str(bare_frontend(tree))]
                 if has_flag(tree, "--front-end-root") and importlib.util.find_spec("comfyui_frontend_package") is None
                 else [])
        instances.append(Instance(tree, f"plain{n}", free_port(), workdir, instance_env, extra_args=extra,
                                  cpu=False, prefix=prefix).start())
    for instance in instances:
        instance.wait_ready(600)
    return instances


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sizes", default="512:4,1024:2", help="WIDTH:IMAGES_PER_GPU, comma-separated")
    parser.add_argument("--extension", type=Path, default=REPO, help="the extension folder to benchmark")
    parser.add_argument("--no-hand", action="store_true", help="skip the plain instances (one and by hand)")
    parser.add_argument("--profile", action="store_true", help="sample the master with py-spy")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sizes = [tuple(int(x) for x in item.split(":")) for item in args.sizes.split(",")]
    figures: dict = {"bench": "scaling", "date": time.strftime("%Y-%m-%d"), "steps": STEPS,
                     "extension": str(args.extension), "rows": [], "profile": None}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        # the extension's routes (GET /distributed/status among them) answer only with the secret
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COMFYUI_DISTRIBUTED_SECRET_FILE": str(workdir / "secret.key")}
        tree = prepare_tree(workdir / "comfyui")
        link = tree / "custom_nodes" / EXTENSION_NAME
        link.unlink()
        link.symlink_to(args.extension.resolve(), target_is_directory=True)
        plain_tree = prepare_tree(workdir / "comfyui-plain")
        (plain_tree / "custom_nodes" / EXTENSION_NAME).unlink()  # ComfyUI as it comes
        checkpoint = build_checkpoint(tree, args.checkpoint or workdir / "sd15.safetensors")
        link_checkpoint(tree, checkpoint)
        link_checkpoint(plain_tree, checkpoint)
        env[config_file.ENV_VAR] = str(workdir / "gpu_config.json")
        process, config, master_pid, config_path = start_ours(workdir, tree, args.extension, env)
        master = Instance(tree, "master", config["master"]["port"], workdir, env)
        hand = [] if args.no_hand else start_plain(workdir, plain_tree, config, env)
        gpus = 1 + len(config["workers"])
        counts = [n for n in (1, 2, 4, 8) if n <= gpus]
        try:
            for size, per_gpu in sizes:
                def batch_prompt(_k, images=per_gpu):
                    return txt2img(latent("plain", size, images), STEPS, seed=next(SEEDS))
                one_rate = one_span = None
                if hand:
                    median, _all, spans = measure(lambda k: hand[0].timed(plain(batch_prompt(k))), args.runs)
                    one_rate, one_span = per_gpu / median, statistics.median(spans) if spans else None
                    print(f"{size}px, one plain instance, batch {per_gpu}: {one_rate:.2f} images/s"
                          + (f", prompt ran {one_span:.2f} s" if one_span else ""), flush=True)
                for n in counts:
                    trial = json.loads(json.dumps(config))
                    for i, worker in enumerate(trial["workers"]):
                        worker["enabled"] = i < n - 1
                    write_config(config_path, trial)
                    row = {"size": size, "per_gpu": per_gpu, "gpus": n, "one_instance": one_rate}
                    if hand:
                        median, _all, _spans = measure(
                            lambda k: all_at_once(hand[:n], lambda j: plain(batch_prompt(j))), args.runs)
                        row["by_hand"] = n * per_gpu / median
                    profiler = None
                    for mode in ("multiply", "split"):
                        if mode == "multiply":
                            def make(k):
                                return seeded(batch_prompt(k), next(SEEDS) * 100)  # units take seed + k
                        else:
                            def make(_k):
                                return txt2img(latent("split", size, n * per_gpu), STEPS, seed=next(SEEDS))
                        if args.profile and mode == "multiply" and n == counts[-1] and size == sizes[0][0]:
                            if shutil.which("py-spy"):
                                master.timed(make(0))  # warm before sampling starts
                                profiler = Profiler(master_pid, workdir / "profile.txt")
                            else:
                                print("py-spy is not installed: no profile", flush=True)
                        median, _all, spans = measure(lambda k: master.timed(make(k)), args.runs)
                        if profiler is not None:
                            figures["profile"] = {"gpus": n, "size": size, "samples": profiler.stop()}
                            profiler = None
                        row[mode] = n * per_gpu / median
                        row[f"{mode}_master_prompt_s"] = statistics.median(spans) if spans else None
                        print(f"{size}px, {n} GPU(s), {mode}: {row[mode]:.2f} images/s"
                              + (f", master's prompt ran {row[f'{mode}_master_prompt_s']:.2f} s" if spans else ""),
                              flush=True)
                    row["one_prompt_s"] = one_span
                    figures["rows"].append(row)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
            for instance in hand:
                instance.stop()
            if args.out:  # keep the launcher's and instances' logs beside the figures
                for log in [workdir / "launcher.log", *workdir.glob("plain*.log")]:
                    if log.exists():
                        (args.out.parent / f"scaling-{log.name}").write_bytes(log.read_bytes()[-200_000:])
    print_table(figures)
    emit(figures, args.out)
    return 0


def print_table(figures: dict) -> None:
    def ratio(a, b):
        return f"{a / b:.3f}" if a and b else "-"
    print(f"\n{'size':>5} {'GPUs':>4} {'one':>6} {'by hand':>8} {'multiply':>9} {'split':>7}  "
          f"{'mult/ideal':>10} {'mult/hand':>9} {'split/ideal':>11} {'split/hand':>10}  master prompt vs plain")
    for row in figures["rows"]:
        ideal = row["gpus"] * row["one_instance"] if row["one_instance"] else None
        hand = row.get("by_hand")
        fmt = (lambda v: f"{v:.2f}" if v else "-")
        spans = (f"{row['multiply_master_prompt_s']:.2f} s vs {row['one_prompt_s']:.2f} s"
                 if row.get("multiply_master_prompt_s") and row.get("one_prompt_s") else "-")
        print(f"{row['size']:>5} {row['gpus']:>4} {fmt(row['one_instance']):>6} {fmt(hand):>8} "
              f"{row['multiply']:>9.2f} {row['split']:>7.2f}  {ratio(row['multiply'], ideal):>10} "
              f"{ratio(row['multiply'], hand):>9} {ratio(row['split'], ideal):>11} {ratio(row['split'], hand):>10}  "
              f"{spans}")
    profile = figures.get("profile")
    if profile:
        print(f"\nWhere the master's busy samples went ({profile['gpus']} GPUs, {profile['size']}px, multiply):")
        for where, counts in profile["samples"].items():
            total = sum(counts.values()) or 1
            parts = ", ".join(f"{name} {100 * c / total:.0f} %" for name, c in
                              sorted(counts.items(), key=lambda kv: -kv[1]))
            print(f"  {where} ({total} samples): {parts}")


if __name__ == "__main__":
    sys.exit(main())
