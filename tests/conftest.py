"""Fixtures: one real ComfyUI master and two real workers for the whole session (starting ComfyUI
costs seconds), with the config reset before each test that uses them."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import harness  # noqa: E402


class Cluster:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.tree = harness.prepare_tree(workdir / "comfyui")
        self.config_path = workdir / "gpu_config.json"
        self.probe_log = workdir / "probe.jsonl"
        self.env = {**os.environ, "COMFYUI_DISTRIBUTED_CONFIG": str(self.config_path),
                    "DISTRIBUTED_TEST_PROBE_LOG": str(self.probe_log), "PYTHONUNBUFFERED": "1",
                    "COMFYUI_DISTRIBUTED_SECRET_FILE": str(workdir / "secret.key"),
                    "DISTRIBUTED_TEST_SPEED_FILE": str(workdir / "speeds.json")}
        ports = [harness.free_port() for _ in range(3)]
        self.master = harness.Instance(self.tree, "master", ports[0], workdir, self.env)
        self.workers = [harness.Instance(self.tree, f"worker{i + 1}", p, workdir, self.env)
                        for i, p in enumerate(ports[1:])]
        self.reset_config()

    @property
    def instances(self):
        return [self.master, *self.workers]

    def default_config(self, **settings) -> dict:
        return {
            "master": {"port": self.master.port, "device": 0, "enabled": True},
            "workers": [{"id": w.name, "name": w.name, "port": w.port, "device": i + 1, "enabled": True,
                         "extra_args": ""} for i, w in enumerate(self.workers)],
            "settings": {"stagger_delay": 0.0, "job_timeout": 20, "mode": "parallel", **settings},
        }

    def reset_config(self, data: dict | None = None) -> dict:
        data = data or self.default_config()
        harness.write_config(self.config_path, data)
        return data

    def start(self) -> "Cluster":
        for instance in self.instances:
            instance.start()
        for instance in self.instances:
            instance.wait_ready()
        return self

    def stop(self) -> None:
        for instance in self.instances:
            instance.stop()

    def set_speeds(self, speeds: dict | None = None) -> None:
        """Emulated speed factor per instance name for the probe node; missing names run at 1."""
        import json
        ports = {i.name: i.port for i in self.instances}
        (self.workdir / "speeds.json").write_text(json.dumps({str(ports[n]): f for n, f in (speeds or {}).items()}))

    def probes(self) -> list[dict]:
        import json
        if not self.probe_log.exists():
            return []
        return [json.loads(line) for line in self.probe_log.read_text().splitlines() if line.strip()]


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
    for leftover in cluster.workdir.glob("throughput.json*"):
        leftover.unlink()
    harness.wait_until(lambda: all(i.idle() for i in cluster.instances), 60, what="idle instances")
    if cluster.probe_log.exists():
        cluster.probe_log.unlink()
    yield cluster
    cluster.reset_config()
