"""Does the master stay responsive with many distributed jobs queued at once?

    COMFYUI_ROOT=<ComfyUI folder> python tests/benchmarks/bench_load.py [--jobs 200] [--workers 2]
        [--size 8] [--seconds 0.1] [--gpu] [--out FILE]

Starts a real master and ``--workers`` workers on loopback (CPU instances; with --gpu one instance
per GPU, CUDA_VISIBLE_DEVICES per instance), queues ``--jobs`` cheap Multi-GPU Collector jobs at
once (model-free: EmptyImage of ``--size`` pixels -> Collector -> SaveImage), and while they run
samples GET /prompt on the master every 50 ms. Prints the latency of those answers (p50, p95,
max), the master process's CPU use, failovers (from the master's log) and jobs that failed or
gave wrong images, then one JSON line.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import Cluster, blue_values, emit, error_of, image_workflow, wait_until  # noqa: E402


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its threads, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=0.1,
                        help="emulated render time per image: long enough that the jobs stay queued")
    parser.add_argument("--gpu", action="store_true", help="one instance per GPU instead of CPU instances")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(Path(tmp), workers=args.workers, cpu=not args.gpu)
        if args.gpu:
            for device, instance in enumerate(cluster.instances):
                instance.env = {**cluster.env, "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": str(device)}
        cluster.reset_config(cluster.default_config(job_timeout=120))
        try:
            cluster.start()
            master = cluster.master
            wait_until(lambda: all(r["state"] in ("online", "busy") for r in
                                   master.get("/distributed/status", timeout=30).json()["instances"]),
                       60, interval=0.3, what="the master to see every worker")
            # one job first, so that nothing measured is a first-run cost
            entry = master.wait_prompt(master.queue_prompt(image_workflow(seed=1, batch=1, size=args.size)), 120)
            assert not error_of(entry), error_of(entry)
            log_start = master.log_path.stat().st_size
            latencies: list[float] = []
            stop = threading.Event()
            remaining = [0]  # the master's queue as the samples see it, for the figures
            most_queued = [0]

            def sample():
                session = requests.Session()
                while not stop.is_set():
                    began = time.perf_counter()
                    try:
                        answer = session.get(master.url + "/prompt", timeout=30).json()
                        latencies.append(time.perf_counter() - began)
                        remaining[0] = answer["exec_info"]["queue_remaining"]
                        most_queued[0] = max(most_queued[0], remaining[0])
                    except requests.RequestException:
                        latencies.append(30.0)
                    stop.wait(0.05)

            sampler = threading.Thread(target=sample, daemon=True)
            cpu_before, started = cpu_seconds(master.process.pid), time.perf_counter()
            sampler.start()
            seeds = [(7 * k) % 250 for k in range(args.jobs)]
            prompt_ids = [master.queue_prompt(image_workflow(seed=s, batch=1, size=args.size, seconds_per_image=args.seconds,
                                                             label="load")) for s in seeds]
            queued_in = time.perf_counter() - started
            master.wait_prompt(prompt_ids[-1], 3600)  # the master runs its queue in order: the last one ends last
            wall = time.perf_counter() - started
            cpu = cpu_seconds(master.process.pid) - cpu_before
            stop.set()
            sampler.join()
            failed, wrong = 0, 0
            participants = 1 + args.workers
            for prompt_id, seed in zip(prompt_ids, seeds):
                entry = master.wait_prompt(prompt_id, 60)
                if error_of(entry):
                    failed += 1
                elif blue_values(master.saved_images(entry, "5")) != [(seed + k) % 256 for k in range(participants)]:
                    wrong += 1
            logged = master.log_path.read_bytes()[log_start:].decode("utf-8", errors="replace")
            failovers = logged.count(" go to ")
            failures = logged.count(" failed: ")
        finally:
            cluster.stop()
    ms = [1000 * x for x in latencies]
    figures = {"bench": "load", "date": time.strftime("%Y-%m-%d"), "jobs": args.jobs, "workers": args.workers,
               "device": "gpu" if args.gpu else "cpu", "size": args.size,
               "get_prompt_ms_p50": round(statistics.median(ms), 1), "get_prompt_ms_p95": round(percentile(ms, 0.95), 1),
               "get_prompt_ms_max": round(max(ms), 1), "samples": len(ms),
               "master_cpu_percent": round(100 * cpu / wall, 1), "wall_s": round(wall, 1),
               "queued_in_s": round(queued_in, 2), "most_queued": most_queued[0], "jobs_failed": failed, "jobs_wrong_images": wrong,
               "share_failures": failures, "failovers": failovers}
    print(f"{args.jobs} jobs on a master and {args.workers} workers ({figures['device']}): all done in {wall:.1f} s "
          f"(queued in {queued_in:.1f} s; at most {most_queued[0]} in the master's queue at once)")
    print(f"GET /prompt on the master: p50 {figures['get_prompt_ms_p50']} ms, p95 {figures['get_prompt_ms_p95']} ms, "
          f"max {figures['get_prompt_ms_max']} ms over {len(ms)} samples")
    print(f"master CPU {figures['master_cpu_percent']} % of one core; share failures {failures}, failovers "
          f"{failovers}, failed jobs {failed}, jobs with wrong images {wrong}")
    emit(figures, args.out)
    return 0 if failed == wrong == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
