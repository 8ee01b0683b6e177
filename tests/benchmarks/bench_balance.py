"""Split-mode balancing on GPUs of different speeds, against an equal split.

    COMFYUI_ROOT=<ComfyUI folder> python tests/benchmarks/bench_balance.py [--batch 28] [--cost 2.0]

A master that only orchestrates and three real ComfyUI workers whose speeds are 1:2:4: the test-only
probe node really spends `cost / speed` seconds per image on each. It prints the makespan divided
by the ideal (total work / sum of rates) for
- an equal split: each worker renders batch/3 images at once (run directly on the workers, in
  parallel, as an extension without balancing would), and
- our balancing: one split-mode job through the Multi-GPU Collector, after one warm-up job from
  which the master learns the speeds.
Needs the test environment (python tests/run.py builds it); COMFYUI_ROOT as for the tests.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import Cluster, batch_indices, emit, split_workflow  # noqa: E402

SPEEDS = {"worker1": 1.0, "worker2": 2.0, "worker3": 4.0}


def equal_split(cluster: Cluster, batch: int, cost: float) -> float:
    shares = [batch // 3 + (1 if i < batch % 3 else 0) for i in range(3)]
    times: list[float] = []

    def one(worker, share):
        times.append(worker.timed(split_workflow(share, cost))[0])
    threads = [threading.Thread(target=one, args=(w, s)) for w, s in zip(cluster.workers, shares)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started


def balanced(cluster: Cluster, batch: int, cost: float) -> float:
    seconds, entry = cluster.master.timed(split_workflow(batch, cost))
    got = batch_indices(cluster.master.saved_images(entry, "5"))
    assert got == list(range(batch)), f"wrong images: {got}"
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=28)
    parser.add_argument("--cost", type=float, default=2.0, help="seconds per image at speed 1")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ideal = args.batch * args.cost / sum(SPEEDS.values())
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(Path(tmp), workers=3)
        config = cluster.default_config()
        config["master"]["enabled"] = False
        cluster.reset_config(config)
        cluster.set_speeds(SPEEDS)
        try:
            cluster.start()
            balanced(cluster, args.batch, args.cost)  # warm-up: the master learns the speeds
            equal_split(cluster, 3, args.cost)        # warm-up of the direct path
            rows = {"equal": [], "balanced": []}
            for _ in range(args.rounds):  # interleaved, so drift hits both alike
                rows["equal"].append(equal_split(cluster, args.batch, args.cost) / ideal)
                rows["balanced"].append(balanced(cluster, args.batch, args.cost) / ideal)
        finally:
            cluster.stop()
    equal, ours = statistics.median(rows["equal"]), statistics.median(rows["balanced"])
    print(f"split batch of {args.batch} on 3 workers at speeds 1:2:4, {args.cost:g} s per image at speed 1; "
          f"ideal makespan {ideal:.2f} s; median of {args.rounds}")
    print(f"  equal split      makespan / ideal = {equal:.2f}")
    print(f"  our balancing    makespan / ideal = {ours:.2f}")
    emit({"bench": "balance", "batch": args.batch, "ideal_s": round(ideal, 3),
          "equal_split_ratio": round(equal, 3), "balanced_ratio": round(ours, 3), "rounds": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
