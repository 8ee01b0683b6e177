"""What finding a worker through Ray costs: the same ComfyUI worker, started by a Ray actor, used as a
Ray worker (the config's ray section) and as a worker configured by hand (its host and port), in turn.

    COMFYUI_ROOT=<ComfyUI folder> python tests/benchmarks/bench_ray.py [--runs 10] [--cost 0.5]

A local Ray head with one logical GPU; the master only orchestrates, so the one worker renders every
job. Median wall time from POST /prompt to the finished history entry, over interleaved runs.
Needs the test environment (python tests/run.py builds it, Ray included); COMFYUI_ROOT as for the tests.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import Cluster, emit, free_port, image_workflow, wait_until, write_config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--cost", type=float, default=0.5, help="seconds the workflow spends rendering")
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    ray_cli = str(Path(sys.executable).with_name("ray"))
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([ray_cli, "start", "--head", f"--port={port}", "--num-gpus=1", "--num-cpus=4",
                        "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={tmp}/ray"],
                       env=env, check=True, capture_output=True)
        cluster = Cluster(Path(tmp), workers=0)
        by_ray = {"master": {"port": cluster.master.port, "enabled": False}, "workers": [],
                  "ray": {"address": f"127.0.0.1:{port}", "workers": 1, "extra_args": "--cpu"},
                  "settings": {"job_timeout": 60}}
        try:
            write_config(cluster.config_path, by_ray)
            cluster.master.start().wait_ready()
            status = lambda: cluster.master.get("/distributed/status").json()  # noqa: E731
            found = wait_until(lambda: status()["ray"]["workers"], 300, interval=1.0, what="the Ray worker")[0]
            by_hand = {**by_ray, "workers": [{"id": "byhand", "host": found["host"], "port": found["port"]}]}
            by_hand.pop("ray")
            times: dict[str, list[float]] = {"ray": [], "hand": []}
            for run in range(args.runs + 1):  # the first of each warms up
                for name, config in (("hand", by_hand), ("ray", by_ray)):
                    write_config(cluster.config_path, config)
                    wait_until(lambda: [r for r in status()["instances"] if r["role"] == "worker"
                                        and r["state"] == "online"], 120, interval=0.2, what=f"the worker ({name})")
                    seconds = cluster.master.timed(image_workflow(seed=500 + run, batch=1, size=args.size,
                                                                  seconds_per_image=args.cost))[0]
                    if run:
                        times[name].append(seconds)
        finally:
            cluster.stop()
            subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True)
    hand, ray = statistics.median(times["hand"]), statistics.median(times["ray"])
    print(f"one {args.size}x{args.size} image costing {args.cost:g} s on one worker, median of {args.runs} "
          "interleaved runs")
    print(f"  worker configured by hand   {hand * 1000:8.1f} ms")
    print(f"  the same worker through Ray {ray * 1000:8.1f} ms")
    print(f"  difference                  {(ray - hand) * 1000:+8.1f} ms ({(ray / hand - 1) * 100:+.1f} %)")
    emit({"bench": "ray", "by_hand_ms": round(hand * 1000, 1), "ray_ms": round(ray * 1000, 1),
          "difference_ms": round((ray - hand) * 1000, 1), "difference_pct": round((ray / hand - 1) * 100, 2)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
