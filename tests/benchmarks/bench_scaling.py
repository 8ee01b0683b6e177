"""Scaling across real GPUs: the launcher detects the GPUs and starts one ComfyUI per GPU; then the
throughput of the Multi-GPU Collector is measured with 1, 2, 4 and 8 of them (as many as there are).

    COMFYUI_ROOT=<ComfyUI folder> python tests/benchmarks/bench_scaling.py [--checkpoint PATH] [--runs 3]

SD1.5-shaped model with random weights (built from ComfyUI's own classes, nothing downloaded),
512x512, 20 steps, euler. Multiply mode renders batch 4 on every GPU; split mode a total batch of 8
per GPU. Scaling efficiency = throughput with N GPUs / (N x throughput with one). Prints a table and
ends with one JSON line.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distributed_core import config as config_file  # noqa: E402
from harness import (Instance, bare_frontend, build_checkpoint, emit, has_flag, latent,  # noqa: E402
                     link_checkpoint, prepare_tree, txt2img, write_config)

SIZE, STEPS = 512, 20
LAUNCHER = Path(__file__).resolve().parents[2] / "distributed_core" / "launcher.py"


def seeded(prompt: dict, seed: int) -> dict:
    """Route the sampler's seed through a Distributed Seed, so every GPU draws its own images."""
    prompt = json.loads(json.dumps(prompt))
    prompt["9"] = {"class_type": "DistributedSeed", "inputs": {"seed": seed}}
    prompt["5"]["inputs"]["seed"] = ["9", 0]
    return prompt


def timed(master: Instance, prompt: dict) -> tuple[float, int]:
    seconds, entry = master.timed(prompt)
    return seconds, len(entry["outputs"]["8"]["images"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        tree = prepare_tree(workdir / "comfyui")
        link_checkpoint(tree, build_checkpoint(tree, args.checkpoint or workdir / "sd15.safetensors"))
        config_path = workdir / "gpu_config.json"
        env = {**os.environ, config_file.ENV_VAR: str(config_path)}
        command = [sys.executable, str(LAUNCHER), "--config", str(config_path), "--comfyui", str(tree)]
        subprocess.run([*command, "--dry-run"], env=env, check=True)  # detects the GPUs, writes the config
        if has_flag(tree, "--front-end-root") and importlib.util.find_spec("comfyui_frontend_package") is None:
            detected = json.loads(config_path.read_text())  # headless: a bare page instead of the frontend
            for instance in (detected["master"], *detected["workers"]):
                instance["extra_args"] = f"{instance.get('extra_args', '')} --front-end-root {bare_frontend(tree)}".strip()
            write_config(config_path, detected)
        launcher = subprocess.Popen([*command, "--wait-timeout", "600"], env=env)
        try:
            while not config_path.exists() and launcher.poll() is None:
                time.sleep(0.5)  # the launcher detects the GPUs and writes the config first
            config = json.loads(config_path.read_text())
            master = Instance(tree, "master", config["master"]["port"], workdir, env)
            deadline = time.monotonic() + 900
            while True:  # every instance answers once the launcher has printed its table
                try:
                    states = [i["state"] for i in master.get("/distributed/status").json()["instances"]]
                    if all(s == "online" for s in states):
                        break
                except Exception:  # noqa: BLE001 - not up yet
                    pass
                if launcher.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the launcher did not bring every instance up")
                time.sleep(1)
            gpus = 1 + len(config["workers"])
            counts = [n for n in (1, 2, 4, 8) if n <= gpus]
            rows = []
            for n in counts:
                trial = json.loads(json.dumps(config))
                for i, worker in enumerate(trial["workers"]):
                    worker["enabled"] = i < n - 1
                write_config(config_path, trial)
                for mode, make in (("multiply", lambda s: seeded(txt2img(latent("plain", SIZE, 4), STEPS), s)),
                                   ("split", lambda s: txt2img(latent("split", SIZE, 8 * n), STEPS, seed=s))):
                    timed(master, make(1))  # warm-up: models load, split mode learns the speeds
                    seconds, images = [], 0
                    for run in range(args.runs):
                        took, images = timed(master, make(100 + run))
                        seconds.append(took)
                    rate = images / statistics.median(seconds)
                    rows.append({"gpus": n, "mode": mode, "images": images, "images_per_s": round(rate, 3)})
                    print(f"{n} GPU(s), {mode}: {images} images, {rate:.2f} images/s", flush=True)
        finally:
            launcher.send_signal(signal.SIGTERM)
            launcher.wait(60)
    for row in rows:
        one = next(r["images_per_s"] for r in rows if r["gpus"] == 1 and r["mode"] == row["mode"])
        row["efficiency"] = round(row["images_per_s"] / (row["gpus"] * one), 3)
    print(f"{'GPUs':>5} {'mode':>9} {'images/s':>9} {'efficiency':>11}")
    for row in rows:
        print(f"{row['gpus']:>5} {row['mode']:>9} {row['images_per_s']:>9.2f} {row['efficiency']:>11.3f}")
    emit({"bench": "scaling", "date": time.strftime("%Y-%m-%d"), "size": SIZE, "steps": STEPS, "rows": rows},
         args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
