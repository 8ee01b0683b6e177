#!/usr/bin/env python3
"""Soak benchmark: a real master and two real workers on loopback run many small distributed jobs
back to back, several in flight at once, and we look at what is left behind.

    COMFYUI_ROOT=/path/to/ComfyUI python tests/benchmarks/bench_soak.py [--jobs 200] [--in-flight 4]

Prints, as it goes and at the end: failed jobs (goal zero), the master's RSS growth from after a
warm-up to the end, jobs the master still holds, files left in the master's temp folder and prompts
left queued on the workers; the last line is one JSON object with those figures. Exits 1 when any
job failed or anything was left behind. Not a pytest test: a script, run by hand.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness  # noqa: E402
from harness import Cluster, emit  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def finished(master: harness.Instance, prompt_id: str) -> dict | None:
    entry = master.get(f"/history/{prompt_id}", timeout=30).json().get(prompt_id)
    if entry and (entry.get("outputs") or entry.get("status", {}).get("status_str") in ("success", "error")):
        return entry
    return None


def check(master: harness.Instance, entry: dict, seed: int) -> str:
    """'' when the job gave the whole batch in order, else what went wrong."""
    error = harness.error_of(entry)
    if error:
        return error
    try:
        got = harness.blue_values(master.saved_images(entry, "5"))
    except (KeyError, OSError) as exc:
        return f"no images: {exc!r}"
    return "" if got == [seed, seed + 1, seed + 2] else f"images {got}, expected {[seed, seed + 1, seed + 2]}"


def files_in(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200, help="how many jobs to run (default 200)")
    parser.add_argument("--in-flight", type=int, default=4, help="jobs queued at once (default 4)")
    parser.add_argument("--warmup", type=int, default=10, help="jobs before the first RSS reading (default 10)")
    parser.add_argument("--timeout", type=float, default=180, help="seconds one job may take (default 180)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs) afterwards")
    parser.add_argument("--out", type=Path, help="also write the JSON figures here")
    args = parser.parse_args(argv)
    if args.jobs <= args.warmup:
        parser.error("--jobs must be larger than --warmup")

    workdir = Path(tempfile.mkdtemp(prefix="comfyui-distributed-soak-"))
    print(f"[soak] work folder {workdir}; starting a master and 2 workers", flush=True)
    cluster = Cluster(workdir)
    began = time.monotonic()
    failures: list[str] = []
    try:
        cluster.start()
        master = cluster.master
        pid = master.process.pid
        print(f"[soak] cluster up in {time.monotonic() - began:.0f} s; master pid {pid}, "
              f"RSS {rss_mb(pid):.0f} MB; {args.jobs} jobs, {args.in_flight} in flight", flush=True)
        in_flight: dict[str, tuple[int, int, float]] = {}  # prompt id -> (job number, seed, queued at)
        submitted = done = 0
        rss_warm = None
        run_began = time.monotonic()
        while done < args.jobs:
            while submitted < args.jobs and len(in_flight) < args.in_flight:
                seed = submitted % 250  # blue is the seed's low byte: seed + 2 must stay below 256
                prompt_id = master.queue_prompt(harness.image_workflow(seed=seed, batch=1, label=f"soak{submitted}"))
                in_flight[prompt_id] = (submitted, seed, time.monotonic())
                submitted += 1
            for prompt_id, (number, seed, queued) in list(in_flight.items()):
                entry = finished(master, prompt_id)
                if entry is None:
                    if time.monotonic() - queued > args.timeout:
                        failures.append(f"job {number}: not finished after {args.timeout:g} s")
                        del in_flight[prompt_id]
                        done += 1
                    continue
                del in_flight[prompt_id]
                done += 1
                problem = check(master, entry, seed)
                if problem:
                    failures.append(f"job {number}: {problem}")
                    print(f"[soak] job {number} FAILED: {problem}", flush=True)
                if done == args.warmup:
                    rss_warm = rss_mb(pid)
                    print(f"[soak] warm-up done: master RSS {rss_warm:.1f} MB", flush=True)
                if done % 25 == 0:
                    rate = done / (time.monotonic() - run_began) * 60
                    print(f"[soak] {done}/{args.jobs} jobs, {rate:.0f} jobs/min, master RSS {rss_mb(pid):.1f} MB, "
                          f"{len(failures)} failed", flush=True)
            time.sleep(0.1)
        run_seconds = time.monotonic() - run_began

        # what is left once everything has settled
        harness.wait_until(lambda: all(i.idle() for i in cluster.instances), 60, what="idle instances")
        time.sleep(3)
        rss_end = rss_mb(pid)
        jobs_left = master.get("/distributed/status", timeout=30).json()["jobs"]
        temp_files = files_in(master.dirs["temp"])
        queued_on_workers = {}
        for worker in cluster.workers:
            queue = worker.get("/queue").json()
            queued_on_workers[worker.name] = len(queue["queue_running"]) + len(queue["queue_pending"])
        figures = {
            "bench": "soak", "date": time.strftime("%Y-%m-%d"), "jobs": args.jobs, "in_flight": args.in_flight, "failures": len(failures),
            "seconds": round(run_seconds, 1), "jobs_per_minute": round(args.jobs / run_seconds * 60, 1),
            "master_rss_after_warmup_mb": round(rss_warm, 1), "master_rss_end_mb": round(rss_end, 1),
            "master_rss_growth_mb": round(rss_end - rss_warm, 1),
            "master_rss_growth_kb_per_job": round((rss_end - rss_warm) * 1024 / (args.jobs - args.warmup), 1),
            "leftover_jobs": len(jobs_left), "leftover_temp_files": len(temp_files),
            "leftover_worker_prompts": sum(queued_on_workers.values()),
        }
        print(f"[soak] failures: {len(failures)}")
        for line in failures[:10]:
            print(f"[soak]   {line}")
        print(f"[soak] master RSS: {rss_warm:.1f} MB after {args.warmup} jobs -> {rss_end:.1f} MB at the end "
              f"({rss_end - rss_warm:+.1f} MB)")
        print(f"[soak] jobs left on the master: {len(jobs_left)} {[j['job_id'][:8] for j in jobs_left]}")
        print(f"[soak] files left in the master's temp folder: {len(temp_files)} {temp_files[:10]}")
        print(f"[soak] prompts left on the workers: {queued_on_workers}")
        emit(figures, args.out)
        return 1 if failures or jobs_left or temp_files or figures["leftover_worker_prompts"] else 0
    finally:
        cluster.stop()
        if args.keep or failures:
            print(f"[soak] logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
