"""GPU benchmark: SD1.5-shaped model (random weights, nothing downloaded), 512x512, 20 steps, euler.

    COMFYUI_ROOT=<ComfyUI folder> python tests/benchmarks/bench_gpu.py [--checkpoint PATH] [--runs 5]

On one GPU it measures
- one instance at batch 1, 4 and 8 (images/s, after a warm-up that loads the model);
- the distributed path against that instance: a master that only orchestrates and one worker
  rendering batch 4, against the same workflow run directly on that worker (time ratio);
- that split mode's images equal a single-instance run of the same batch of 8, rendered by the
  master and a worker on the same GPU (mean and max difference, in 1/255, and for scale the
  difference between two seeds).
Both instances share the GPU. Prints a table and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import Cluster, build_checkpoint, emit, latent, link_checkpoint, txt2img  # noqa: E402

SIZE, STEPS = 512, 20


def images_of(instance, entry) -> np.ndarray:
    return np.stack(instance.saved_images(entry, "8")).astype(np.float64)


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown GPU"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="where the built checkpoint is kept")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per figure (at least 10 for the overhead)")
    parser.add_argument("--out", type=Path, help="also write the JSON figures here")
    parser.add_argument("--smoke", action="store_true", help="CPU, 64x64, 1 step: checks the script, measures nothing")
    args = parser.parse_args()
    global SIZE, STEPS
    if args.smoke:
        SIZE, STEPS = 64, 1
    figures: dict = {"bench": "gpu", "gpu": "CPU (smoke test)" if args.smoke else gpu_name(), "size": SIZE,
                     "steps": STEPS, "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(Path(tmp), workers=1, cpu=args.smoke)
        built = build_checkpoint(cluster.tree, args.checkpoint or Path(tmp) / "sd15-random.safetensors")
        link_checkpoint(cluster.tree, built)
        master, worker = cluster.master, cluster.workers[0]
        try:
            cluster.start()
            alone = cluster.default_config()
            alone["workers"][0]["enabled"] = False
            cluster.reset_config(alone)

            # one instance
            master.timed(txt2img(latent("plain", SIZE, 1), STEPS))  # loads the model
            single = {}
            for batch in (1, 4, 8):
                seconds = statistics.median(master.timed(txt2img(latent("plain", SIZE, batch), STEPS, seed=s))[0]
                                            for s in range(args.runs))
                single[batch] = batch / seconds
                print(f"one instance, batch {batch}: {single[batch]:.2f} images/s", flush=True)
            figures["single_images_per_s"] = {str(b): round(r, 3) for b, r in single.items()}

            # the distributed path: master orchestrating, the worker rendering, against the worker alone
            orchestrating = cluster.default_config()
            orchestrating["master"]["enabled"] = False
            cluster.reset_config(orchestrating)
            worker.timed(txt2img(latent("plain", SIZE, 4), STEPS))  # loads the model on the worker
            direct, distributed = [], []
            for s in range(max(10, args.runs)):  # interleaved; seeds never repeat, so ComfyUI's cache cannot help either side
                direct.append(worker.timed(txt2img(latent("plain", SIZE, 4), STEPS, seed=100 + s))[0])
                distributed.append(master.timed(txt2img(latent("plain", SIZE, 4), STEPS, seed=200 + s))[0])
            ratio = statistics.median(distributed) / statistics.median(direct)
            figures["distributed_vs_direct_time_ratio"] = round(ratio, 4)
            figures["direct_s"] = [round(x, 3) for x in direct]
            figures["distributed_s"] = [round(x, 3) for x in distributed]
            print(f"master orchestrating + one worker vs that worker alone, batch 4: time ratio {ratio:.3f}")

            # split mode's images against one instance's
            cluster.reset_config(alone)
            _s, entry = master.timed(txt2img(latent("plain", SIZE, 8), STEPS, seed=77))
            reference = images_of(master, entry)
            _s, entry = master.timed(txt2img(latent("plain", SIZE, 8), STEPS, seed=78))
            other_seed = images_of(master, entry)
            cluster.reset_config(cluster.default_config())
            before = len(worker.get("/history").json())
            _s, entry = master.timed(txt2img(latent("split", SIZE, 8), STEPS, seed=77))
            split = images_of(master, entry)
            worker_prompts = len(worker.get("/history").json()) - before
        finally:
            cluster.stop()
            if args.out:  # keep the instances' logs beside the figures
                for instance in cluster.instances:
                    if instance.log_path.exists():
                        (args.out.parent / instance.log_path.name).write_bytes(instance.log_path.read_bytes())
    difference = np.abs(split - reference)
    figures["split_vs_single"] = {"mean": round(float(difference.mean()), 3), "max": int(difference.max()),
                                  "other_seed_mean": round(float(np.abs(other_seed - reference).mean()), 3),
                                  "worker_prompts": worker_prompts}
    print(f"split mode (master + worker) vs one instance, batch 8: mean difference "
          f"{difference.mean():.2f}/255, max {difference.max():.0f}/255 "
          f"(another seed differs by {np.abs(other_seed - reference).mean():.1f}/255 on average)")
    emit(figures, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
