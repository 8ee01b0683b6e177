"""Distributed Tiled Upscale on 1, 2, ... N GPUs, in batches of tiles, beside plain ComfyUI's time
for the same tile: seconds, speedup, where the time goes, and how far each result is from the
one-GPU result.

    COMFYUI_ROOT=<ComfyUI folder> python tests/benchmarks/bench_upscale.py [--gpus N]
        [--cases 1024:1,1024:8,2048:8] [--plain-batches 1,8] [--upscale-by 2] [--tile 512]
        [--padding 32] [--steps 20] [--denoise 0.35] [--runs 3] [--checkpoint PATH] [--cpu] [--out FILE]

One ComfyUI per GPU (CUDA_VISIBLE_DEVICES per instance, each on its own share of the cores as the
launcher would place it), the first one the master. With an SD1.5-shaped model (random weights,
nothing downloaded):

- plain ComfyUI, no node of ours: the tile alone as img2img (a (tile + 2 x padding)-pixel square
  picture, VAE Encode, KSampler --steps steps of euler at --denoise, VAE Decode, Preview Image), one
  prompt per batch of each size in --plain-batches (Repeat Image Batch), seconds per tile from the
  execution span in the history's timestamps: what the GPU needs for a tile, the limit for ours;
- ours: each case SIZE:TILE_BATCH upscales a smooth random SIZE x SIZE picture by --upscale-by with
  --tile px tiles rendered TILE_BATCH at a time, with the master alone and then with 1, 2, ...
  workers enabled. Seconds are from POST /prompt to the saved image (median of --runs after one
  warm-up per GPU count); the execution span is split into the node's tiles (from its log line)
  and the rest of the execution (enlarge, crop, blend, sending the image, saving), beside the time
  before the execution starts and after it ends until the history entry is there (files written),
  and what encoding the result as a PNG alone costs (ComfyUI's level 4). Each image is compared
  with the one-GPU image of its case, and each case with TILE_BATCH > 1 with the TILE_BATCH 1 image
  of its size when there is one: max and mean difference in 8-bit levels.

Prints tables, then one JSON line. --cpu runs N CPU instances instead (to check the script at a
tiny size, e.g. --cpu --gpus 2 --cases 64:1,64:4 --tile 32 --steps 1 --runs 1).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
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
                     link_checkpoint, log_since, log_size, prepare_tree, write_config)

SOURCE = "bench-upscale-source.png"


def models() -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a detailed photo", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
    }


def workflow(args, size: int, tile_batch: int) -> dict:
    return {**models(),
            "4": {"class_type": "LoadImage", "inputs": {"image": source_name(size)}},
            "5": {"class_type": "DistributedTiledUpscale", "inputs": {
                "image": ["4", 0], "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "vae": ["1", 2],
                "upscale_by": args.upscale_by, "seed": 4242, "steps": args.steps, "cfg": 7.0,
                "sampler_name": "euler", "scheduler": "normal", "denoise": args.denoise, "tile_width": args.tile,
                "tile_height": args.tile, "tile_padding": args.padding, "mask_blur": args.padding // 2,
                "tile_batch": tile_batch}},
            "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "bench-upscale"}}}


def plain_workflow(args, batch: int, seed: int) -> dict:
    """The tile as plain ComfyUI renders it, ``batch`` copies in one prompt."""
    prompt = {**models(),
              "4": {"class_type": "LoadImage", "inputs": {"image": PLAIN_SOURCE}},
              "7": {"class_type": "VAEEncode", "inputs": {"pixels": ["4", 0], "vae": ["1", 2]}},
              "8": {"class_type": "KSampler", "inputs": {
                  "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["7", 0],
                  "seed": seed, "steps": args.steps, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
                  "denoise": args.denoise}},
              "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
              "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}}}
    if batch > 1:
        prompt["5"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["4", 0], "amount": batch}}
        prompt["7"]["inputs"]["pixels"] = ["5", 0]
    return prompt


def source_name(size: int) -> str:
    return f"bench-upscale-source-{size}.png"


PLAIN_SOURCE = "bench-upscale-tile.png"
TILE_LINE = re.compile(r"tiled upscale of (\d+) tiles in batches of (\d+): enlarge ([\d.]+) s, tiles ([\d.]+) s, "
                       r"blend ([\d.]+) s")


def stamps(entry: dict) -> tuple[float, float]:
    """(execution_start, execution_success) of a history entry, in seconds since the epoch."""
    found = {kind: data.get("timestamp") for kind, data in entry["status"]["messages"]}
    return found["execution_start"] / 1000.0, found["execution_success"] / 1000.0


def span(entry: dict) -> float:
    """Seconds from execution_start to execution_success in a history entry's messages."""
    start, success = stamps(entry)
    return success - start


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


def parse_cases(text: str) -> list[tuple[int, int]]:
    try:
        cases = [tuple(int(v) for v in part.split(":")) for part in text.split(",")]
    except ValueError:
        cases = []
    if not cases or any(len(c) != 2 or min(c) < 1 for c in cases):
        raise SystemExit(f"--cases takes SIZE:TILE_BATCH pairs such as 1024:1,1024:8, not {text!r}")
    return cases


def measure_plain(master: Instance, args, figures: dict) -> None:
    """Plain ComfyUI's seconds per tile at each batch size: the hardware's limit for ours."""
    seed = 1
    for batch in args.plain_batches:
        spans = []
        for run in range(args.runs + 1):  # the first run warms this batch size up
            seed += 1  # a new seed: ComfyUI would otherwise answer from its cache
            _took, entry = master.timed(plain_workflow(args, batch, seed), 3600)
            if run:
                spans.append(span(entry))
        per_tile = statistics.median(spans) / batch
        figures["plain"].append({"batch": batch, "seconds_per_tile": per_tile, "spans": spans})
        print(f"plain ComfyUI, batch {batch}: {per_tile:.3f} s per tile", flush=True)


def measure_case(master: Instance, args, size: int, tile_batch: int, gpus: int, warm: bool) -> tuple[dict, np.ndarray]:
    prompt = workflow(args, size, tile_batch)
    if not warm:
        master.timed(prompt, 3600)  # warm-up: every enabled instance loads the model
    seconds, spans, parts, image, tile_count, around = [], [], [], None, 0, []
    for _ in range(args.runs):
        start = log_size(master)
        posted = time.time()
        took, entry = master.timed(prompt, 3600)
        began, succeeded = stamps(entry)
        around.append((began - posted, posted + took - succeeded))
        found = TILE_LINE.findall(log_since(master, start))
        seconds.append(took)
        spans.append(span(entry))
        parts.append([float(v) for v in found[-1][2:]] if found else [float("nan")] * 3)
        tile_count = int(found[-1][0]) if found else 0
        image = master.saved_images(entry, "6")[0].astype(np.int16)
    middle = sorted(range(args.runs), key=lambda i: seconds[i])[args.runs // 2]  # the median run's parts
    enlarge, tiles_seconds, blend = parts[middle]
    png = Image.fromarray(image.astype(np.uint8))
    encode_started = time.perf_counter()
    png.save(io.BytesIO(), "PNG", compress_level=4)  # what SaveImage's encode of this image costs
    row = {"size": size, "tile_batch": tile_batch, "gpus": gpus, "seconds": statistics.median(seconds),
           "png_encode": time.perf_counter() - encode_started,
           "all_seconds": seconds, "span": spans[middle], "tiles": tiles_seconds, "enlarge": enlarge, "blend": blend,
           "outside_tiles": spans[middle] - tiles_seconds, "tile_count": tile_count, "shape": list(image.shape),
           # POST to execution_start, and execution_success to the finished history entry (files written)
           "before_execution": around[middle][0], "after_execution": around[middle][1]}
    return row, image


def difference(image: np.ndarray, reference: np.ndarray) -> tuple[int, float]:
    gap = np.abs(image - reference)
    return int(gap.max()), float(gap.mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=0, help="instances to use (default: every GPU)")
    parser.add_argument("--cases", default="1024:1,1024:8,2048:8", help="SIZE:TILE_BATCH pairs")
    parser.add_argument("--plain-batches", default="1,8", help="batch sizes of the plain-ComfyUI tile")
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
    cases = parse_cases(args.cases)
    args.plain_batches = [int(b) for b in args.plain_batches.split(",") if b]
    count = args.gpus or (2 if args.cpu else len(detect_gpus()))
    if count < 1:
        print("no GPU found: pass --cpu --gpus N to run CPU instances", file=sys.stderr)
        return 2
    figures: dict = {"bench": "upscale", "date": time.strftime("%Y-%m-%d"), "cases": args.cases,
                     "upscale_by": args.upscale_by, "tile": args.tile, "padding": args.padding, "steps": args.steps,
                     "denoise": args.denoise, "cpu": args.cpu, "plain": [], "rows": [], "batching": []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        tree = prepare_tree(workdir / "comfyui")
        checkpoint = build_checkpoint(tree, args.checkpoint or workdir / "sd15.safetensors")
        link_checkpoint(tree, checkpoint)
        instances, config_path = start_instances(workdir, tree, count, args.cpu, {**os.environ, "PYTHONUNBUFFERED": "1"})
        master = instances[0]
        for size in {size for size, _batch in cases}:
            source_picture(size).save(master.dirs["input"] / source_name(size))
        source_picture(args.tile + 2 * args.padding).save(master.dirs["input"] / PLAIN_SOURCE)
        config = json.loads(config_path.read_text())
        references: dict = {}
        try:
            for n in range(1, count + 1):
                for i, worker in enumerate(config["workers"]):
                    worker["enabled"] = i < n - 1
                write_config(config_path, config)
                if n == 1:
                    measure_plain(master, args, figures)
                for number, (size, tile_batch) in enumerate(cases):
                    row, image = measure_case(master, args, size, tile_batch, n, warm=number > 0)
                    reference = references.setdefault((size, tile_batch), image)
                    row["max_difference"], row["mean_difference"] = difference(image, reference)
                    one_gpu = next((r for r in figures["rows"] if r["gpus"] == 1 and r["size"] == size
                                    and r["tile_batch"] == tile_batch), row)
                    row["speedup"] = one_gpu["seconds"] / row["seconds"]
                    figures["rows"].append(row)
                    print(f"{n} GPU(s), {size} px, tile_batch {tile_batch}: {row['seconds']:.2f} s "
                          f"(tiles {row['tiles']:.2f} s, the rest of the execution {row['outside_tiles']:.2f} s: "
                          f"enlarge {row['enlarge']:.3f}, blend {row['blend']:.3f}; before it "
                          f"{row['before_execution']:.2f} s, after it {row['after_execution']:.2f} s; a PNG encode of the "
                          f"result {row['png_encode']:.2f} s), "
                          f"difference to 1 GPU: max "
                          f"{row['max_difference']}/255, mean {row['mean_difference']:.3f}/255", flush=True)
                    if n == 1 and tile_batch > 1 and (size, 1) in references:
                        most, mean = difference(image, references[(size, 1)])
                        figures["batching"].append({"size": size, "tile_batch": tile_batch, "max_difference": most,
                                                    "mean_difference": mean})
        finally:
            for instance in instances:
                instance.stop()
            if args.out:
                for instance in instances:
                    if instance.log_path.exists():
                        (args.out.parent / f"upscale-{instance.name}.log").write_bytes(
                            instance.log_path.read_bytes()[-200_000:])
    print(f"\nplain ComfyUI, the same tile ({args.tile + 2 * args.padding} px square), seconds per tile:")
    for plain in figures["plain"]:
        print(f"  batch {plain['batch']:>3}: {plain['seconds_per_tile']:.3f}")
    print(f"\n{'GPUs':>4} {'size':>5} {'batch':>5} {'seconds':>8} {'speedup':>8} {'per tile':>9} {'tiles':>7} "
          f"{'rest':>6} {'after':>6} {'max diff':>9} {'mean diff':>10}")
    for row in figures["rows"]:
        print(f"{row['gpus']:>4} {row['size']:>5} {row['tile_batch']:>5} {row['seconds']:>8.2f} {row['speedup']:>7.2f}x "
              f"{row['tiles'] / max(1, row['tile_count']):>9.3f} {row['tiles']:>7.2f} {row['outside_tiles']:>6.2f} "
              f"{row['after_execution']:>6.2f} "
              f"{row['max_difference']:>9} {row['mean_difference']:>10.3f}")
    for gap in figures["batching"]:
        print(f"tile_batch {gap['tile_batch']} against 1 at {gap['size']} px: max {gap['max_difference']}/255, "
              f"mean {gap['mean_difference']:.3f}/255")
    emit(figures, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
