"""How the master's own CPU time per job grows with the number of workers (emulated on the CPU).

    COMFYUI_ROOT=<ComfyUI folder> python tests/benchmarks/bench_master_cpu.py [--jobs 10] [--workers 1,3,7]
        [--size 256] [--batch 2] [--out FILE]

Eight GPUs mean a master and seven workers. Nothing the master does per job may grow faster than the
images it receives: this starts a master and the most workers asked for as CPU instances on loopback,
runs ``--jobs`` model-free jobs (EmptyImage of ``--size`` pixels, ``--batch`` per participant ->
Multi-GPU Collector -> SaveImage) with 1, 3 and 7 workers enabled, and reads the master process's CPU
time (user + system, from /proc) around them. It prints the CPU milliseconds per job and per image
received; per image should stay flat as workers are added. Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import Cluster, emit, error_of, image_workflow  # noqa: E402


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its threads, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--workers", default="1,3,7")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    counts = sorted(int(x) for x in args.workers.split(","))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(Path(tmp), workers=counts[-1])
        try:
            cluster.start()
            pid = cluster.master.process.pid
            for n in counts:
                config = cluster.default_config()
                for i, worker in enumerate(config["workers"]):
                    worker["enabled"] = i < n
                cluster.reset_config(config)
                run = [0]

                def job():
                    run[0] += 1
                    prompt = image_workflow(seed=1000 * n + run[0], batch=args.batch, size=args.size)
                    entry = cluster.master.wait_prompt(cluster.master.queue_prompt(prompt), 300)
                    if error_of(entry):
                        raise RuntimeError(error_of(entry))
                    return len(entry["outputs"]["5"]["images"])
                job()  # warm-up
                before, started = cpu_seconds(pid), time.perf_counter()
                images = sum(job() for _ in range(args.jobs))
                used, wall = cpu_seconds(pid) - before, time.perf_counter() - started
                row = {"workers": n, "jobs": args.jobs, "images": images,
                       "cpu_ms_per_job": round(1000 * used / args.jobs, 1),
                       "cpu_ms_per_image": round(1000 * used / images, 2), "wall_s_per_job": round(wall / args.jobs, 3)}
                rows.append(row)
                print(f"{n} worker(s): {row['cpu_ms_per_job']} ms CPU per job, {row['cpu_ms_per_image']} ms per image "
                      f"({images // args.jobs} images a job), {row['wall_s_per_job']} s a job", flush=True)
        finally:
            cluster.stop()
    base = rows[0]["cpu_ms_per_image"]
    print(f"\n{'workers':>7} {'images/job':>10} {'CPU ms/job':>10} {'CPU ms/image':>12} {'vs 1 worker':>11}")
    for row in rows:
        print(f"{row['workers']:>7} {row['images'] // row['jobs']:>10} {row['cpu_ms_per_job']:>10} "
              f"{row['cpu_ms_per_image']:>12} {row['cpu_ms_per_image'] / base:>11.2f}")
    emit({"bench": "master_cpu", "date": time.strftime("%Y-%m-%d"), "size": args.size, "batch": args.batch,
          "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
