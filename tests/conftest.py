"""Fixtures: one real ComfyUI master and two real workers for the whole session (starting ComfyUI
costs seconds), with the config reset before each test that uses them."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import harness  # noqa: E402
from harness import Cluster  # noqa: E402,F401  (benchmarks and helpers import it from here too)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.start()
    except Exception:
        c.stop()
        raise
    yield c
    c.stop()


@pytest.fixture
def live(cluster):
    """The session's cluster with the default config, every instance running, awake and idle."""
    import signal
    for instance in cluster.instances:
        instance.signal(signal.SIGCONT)
        if instance.process.poll() is not None:
            instance.start().wait_ready()
    cluster.reset_config()
    cluster.set_speeds()
    for leftover in [*cluster.workdir.glob("throughput.json*"), cluster.workdir / "png.json",
                     cluster.workdir / "memory.json"]:
        leftover.unlink(missing_ok=True)
    harness.wait_until(lambda: all(i.idle() for i in cluster.instances), 60, what="idle instances")
    # and the master's reachability checks have seen every worker answer (a worker seen down,
    # at the cluster's start or after a test killed it, is planned out until it answers again)
    harness.wait_until(lambda: all(r["state"] in ("online", "busy") for r in
                                   cluster.master.get("/distributed/status", timeout=30).json()["instances"]),
                       60, interval=0.3, what="the master to see every worker online")
    if cluster.probe_log.exists():
        cluster.probe_log.unlink()
    yield cluster
    cluster.reset_config()
