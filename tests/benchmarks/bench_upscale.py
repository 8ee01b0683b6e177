"""Distributed Tiled Upscale on 1, 2, ... N GPUs: seconds, speedup, and how far each result is from
the one-GPU result.

    COMFYUI_ROOT=<ComfyUI folder> python tests/benchmarks/bench_upscale.py [--gpus N] [--size 1024]
        [--upscale-by 2] [--tile 512] [--padding 32] [--steps 20] [--denoise 0.35] [--runs 3]
        [--checkpoint PATH] [--cpu] [--out FILE]

One ComfyUI per GPU (CUDA_VISIBLE_DEVICES per instance, each on its own share of the cores as the
launcher would place it), the first one the master. With an SD1.5-shaped model (random weights,
nothing downloaded) it upscales a smooth random SIZE x SIZE picture by --upscale-by with --tile px
tiles, --steps steps of euler at --denoise, with the master alone and then with 1, 2, ... workers
enabled. Every count is warmed up once (models load), then timed --runs times (median, POST /prompt
to the saved image). The seed is the same in every run, so each count's image is compared with the
one-GPU image: max and mean difference in 8-bit levels. Prints a table, then one JSON line.
--cpu runs N CPU instances instead (to check the script at a tiny size, e.g.
--cpu --gpus 2 --size 64 --tile 32 --steps 1 --runs 1).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distributed_core import config as config_file  # noqa: E402
from distributed_core import cpus, launcher  # noqa: E402
from distributed_core.gpus import detect_gpus  # noqa: E402
from harness import (CHECKPOINT, Instance, bare_frontend, build_checkpoint, emit, free_port, has_flag,  # noqa: E402
                     link_checkpoint, prepare_tree, write_config)

SOURCE = "bench-upscale-source.png"


def workflow(args) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a detailed photo", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "LoadImage", "inputs": {"image": SOURCE}},
        "5": {"class_type": "DistributedTiledUpscale", "inputs": {
            "image": ["4", 0], "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "vae": ["1", 2],
            "upscale_by": args.upscale_by, "seed": 4242, "steps": args.steps, "cfg": 7.0, "sampler_name": "euler",
            "scheduler": "normal", "denoise": args.denoise, "tile_width": args.tile, "tile_height": args.tile,
            "tile_padding": args.padding, "mask_blur": args.padding // 2}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "bench-upscale"}},
    }


def source_picture(size: int) -> Image.Image:
    rng = np.random.default_rng(3)
    coarse = rng.integers(0, 256, (size // 16 + 1, size // 16 + 1, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.BICUBIC)


def start_instances(workdir: Path, tree: Path, count: int, cpu: bool, env: dict) -> tuple[list[Instance], Path]:
    ports = [free_port() for _ in range(count)]
    config = {"master": {"port": ports[0], "device": 0, "enabled": True},
              "workers": [{"id": f"gpu{i}", "name": f"gpu{i}", "port": p, "device": i, "enabled": True,
                           "extra_args": ""} for i, p in enumerate(ports[1:], start=1)],
              "settings": {"stagger_delay": 0.0, "job_timeout": 300, "mode": "parallel"}}
    config_path = workdir / "gpu_config.json"
    write_config(config_path, config)
    env = {**env, config_file.ENV_VAR: str(config_path)}
    placements = launcher.cpu_placements(config_file.parse(config), cpu)
    ids = [launcher.MASTER_ID] + [w["id"] for w in config["workers"]]
    extra = ["--front-end-root", str(bare_frontend(tree))] if has_flag(tree, "--front-end-root") else []
    instances = []
    for n, (instance_id, port) in enumerate(zip(ids, ports)):
        pinned, threads = placements.get(instance_id, ([], 0))
        instance_env = {**env, **(cpus.thread_env(threads) if threads else {})}
        if not cpu:
            instance_env |= {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": str(n)}
        prefix = ["taskset", "-c", cpus.format_cpulist(pinned)] if pinned and shutil.which("taskset") else []
        instances.append(Instance(tree, "master" if n == 0 else f"gpu{n}", port, workdir, instance_env,
                                  extra_args=extra, cpu=cpu, prefix=prefix).start())
    for instance in instances:
        instance.wait_ready(900)
    return instances, config_path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=0, help="instances to use (default: every GPU)")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--upscale-by", type=float, default=2.0)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--padding", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--denoise", type=float, default=0.35)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--cpu", action="store_true", help="CPU instances (to check the script)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    count = args.gpus or (2 if args.cpu else len(detect_gpus()))
    if count < 1:
        print("no GPU found: pass --cpu --gpus N to run CPU instances", file=sys.stderr)
        return 2
    figures: dict = {"bench": "upscale", "date": time.strftime("%Y-%m-%d"), "size": args.size,
                     "upscale_by": args.upscale_by, "tile": args.tile, "padding": args.padding, "steps": args.steps,
                     "denoise": args.denoise, "cpu": args.cpu, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        tree = prepare_tree(workdir / "comfyui")
        checkpoint = build_checkpoint(tree, args.checkpoint or workdir / "sd15.safetensors")
        link_checkpoint(tree, checkpoint)
        instances, config_path = start_instances(workdir, tree, count, args.cpu, {**os.environ, "PYTHONUNBUFFERED": "1"})
        master = instances[0]
        source_picture(args.size).save(master.dirs["input"] / SOURCE)
        config = json.loads(config_path.read_text())
        prompt = workflow(args)
        reference = None
        try:
            for n in range(1, count + 1):
                for i, worker in enumerate(config["workers"]):
                    worker["enabled"] = i < n - 1
                write_config(config_path, config)
                master.timed(prompt, 3600)  # warm-up: every enabled instance loads the model
                seconds, image = [], None
                for _ in range(args.runs):
                    took, entry = master.timed(prompt, 3600)
                    seconds.append(took)
                    image = master.saved_images(entry, "6")[0].astype(np.int16)
                reference = image if reference is None else reference
                difference = np.abs(image - reference)
                row = {"gpus": n, "seconds": statistics.median(seconds), "all_seconds": seconds,
                       "max_difference": int(difference.max()), "mean_difference": float(difference.mean()),
                       "shape": list(image.shape)}
                row["speedup"] = figures["rows"][0]["seconds"] / row["seconds"] if figures["rows"] else 1.0
                figures["rows"].append(row)
                print(f"{n} GPU(s): {row['seconds']:.2f} s, speedup {row['speedup']:.2f}x, difference to "
                      f"1 GPU: max {row['max_difference']}/255, mean {row['mean_difference']:.3f}/255", flush=True)
        finally:
            for instance in instances:
                instance.stop()
            if args.out:
                for instance in instances:
                    if instance.log_path.exists():
                        (args.out.parent / f"upscale-{instance.name}.log").write_bytes(
                            instance.log_path.read_bytes()[-200_000:])
    print(f"\n{'GPUs':>4} {'seconds':>8} {'speedup':>8} {'max diff':>9} {'mean diff':>10}")
    for row in figures["rows"]:
        print(f"{row['gpus']:>4} {row['seconds']:>8.2f} {row['speedup']:>7.2f}x {row['max_difference']:>9} "
              f"{row['mean_difference']:>10.3f}")
    emit(figures, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
