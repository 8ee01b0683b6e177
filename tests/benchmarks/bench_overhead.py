"""What distribution costs: a small workflow run directly on one instance, against the same
workflow through the Multi-GPU Collector with the master only orchestrating and one worker doing
all the work.

    COMFYUI_ROOT=<ComfyUI folder> python tests/benchmarks/bench_overhead.py [--runs 12] [--cost 0.5]

Median wall time from POST /prompt to the finished history entry, over interleaved runs.
Needs the test environment (python tests/run.py builds it); COMFYUI_ROOT as for the tests.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import Cluster, emit, image_workflow  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--cost", type=float, default=0.5, help="seconds the workflow spends rendering")
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(Path(tmp), workers=1)
        config = cluster.default_config()
        config["master"]["enabled"] = False
        cluster.reset_config(config)
        try:
            cluster.start()
            cluster.wait_checked()
            worker = cluster.workers[0]
            direct, distributed = [], []
            for run in range(args.runs + 1):  # the first of each warms up
                seed = 1000 + run
                d = worker.timed(image_workflow(seed=seed, batch=1, size=args.size, seconds_per_image=args.cost))[0]
                m = cluster.master.timed(image_workflow(seed=seed, batch=1, size=args.size,
                                                        seconds_per_image=args.cost))[0]
                if run:
                    direct.append(d)
                    distributed.append(m)
        finally:
            cluster.stop()
    d, m = statistics.median(direct), statistics.median(distributed)
    print(f"one {args.size}x{args.size} image costing {args.cost:g} s, median of {args.runs} interleaved runs")
    print(f"  directly on one instance          {d * 1000:8.1f} ms")
    print(f"  master orchestrating, one worker  {m * 1000:8.1f} ms")
    print(f"  overhead                          {(m - d) * 1000:+8.1f} ms ({(m / d - 1) * 100:+.1f} %)")
    emit({"bench": "overhead", "direct_ms": round(d * 1000, 1), "distributed_ms": round(m * 1000, 1),
          "overhead_ms": round((m - d) * 1000, 1), "overhead_pct": round((m / d - 1) * 100, 2)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
