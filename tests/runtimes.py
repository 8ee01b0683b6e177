"""A master's runtime (distributed_core/runtime.py) built on plain values, with no server: for the
unit tests of the fleet and of the kinds of job. ``submit`` runs the prompt hook as ComfyUI's
POST /prompt does, inside the middleware's bookkeeping."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from distributed_core import config as config_file
from distributed_core import plan
from distributed_core import runtime as runtime_module
from distributed_core.fleet import Fleet
from distributed_core.jobs import JobStore
from distributed_core.runtime import Runtime


def make_runtime(config: config_file.Config | None, tmp_path: Path | None, port: int = 18188,
                 store: JobStore | None = None, load: Callable[[], Any] | None = None, **fleet_args) -> Runtime:
    if load is None:
        load = lambda: config_file.Loaded(config, tmp_path / "c.json")  # noqa: E731
    partial = fleet_args.pop("partial_execution", False)
    fleet = Fleet(load, lambda: ("127.0.0.1", port), **fleet_args)
    runtime = Runtime(fleet, store or JobStore(), partial_execution=partial)
    if tmp_path is not None:  # not the repo's throughput.json
        runtime.collectors._throughput = plan.Throughput(tmp_path / "throughput.json")
    return runtime


def submit(runtime: Runtime, prompt: Any, **request) -> tuple[Any, list[str], list[str]]:
    """(the request after the hook, the ids of the jobs planned, the refusals)."""
    pending, refusals = [], []
    tokens = runtime_module.submitted.set(pending), runtime_module.refused.set(refusals)
    try:
        data = runtime.rewrite({"prompt": prompt, "client_id": "t", **request})
    finally:
        runtime_module.submitted.reset(tokens[0])
        runtime_module.refused.reset(tokens[1])
    return data, [job_id for _kind, job_id in pending], refusals
