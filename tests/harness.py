"""Real ComfyUI servers on loopback for the tests: a copy of the ComfyUI tree named by COMFYUI_ROOT
with this extension (and the test-only nodes) in its custom_nodes, and instances started as processes."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from distributed_core import sandbox

REPO = Path(__file__).resolve().parent.parent
SUPPORT = Path(__file__).resolve().parent / "support"
EXTENSION_NAME = "comfyui-distributed-under-test"  # deliberately not the repo's name: nothing may depend on it


def comfy_root() -> Path:
    root = os.environ.get("COMFYUI_ROOT")
    if not root or not (Path(root) / "main.py").exists():
        raise RuntimeError("COMFYUI_ROOT must name a ComfyUI folder (with main.py); "
                           "run the suite through `python3 tests/run.py`, which sets it up")
    return Path(root)


def prepare_tree(dest: Path) -> Path:
    """A private ComfyUI tree: the real code, our extension and the test-only nodes linked in, and
    user settings that keep the current frontend's first-run templates dialog shut."""
    tree = sandbox.prepare_tree(comfy_root(), dest, EXTENSION_NAME,
                                {"distributed_test_nodes": SUPPORT / "distributed_test_nodes"})
    settings = tree / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    return tree


def has_flag(tree: Path, flag: str) -> bool:
    return flag in (tree / "comfy" / "cli_args.py").read_text(encoding="utf-8")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Instance:
    """One ComfyUI server process."""

    def __init__(self, tree: Path, name: str, port: int, workdir: Path, env: dict[str, str],
                 extra_args: list[str] | None = None, cpu: bool = True, host: str = "127.0.0.1",
                 prefix: list[str] | None = None):
        self.tree, self.name, self.port, self.host = tree, name, port, host
        self.url = f"http://{host}:{port}"
        self.prefix = prefix or []  # e.g. ip netns exec NAME, to run on another (test) host
        self.dirs = {d: workdir / name / d for d in ("output", "input", "temp")}
        self.log_path = workdir / f"{name}.log"
        self.env = env
        self.extra_args = extra_args or []
        self.cpu = cpu
        self.process: subprocess.Popen | None = None

    def start(self) -> "Instance":
        for d in self.dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        args = [*self.prefix, sys.executable, "main.py", *(["--cpu"] if self.cpu else []), "--listen", self.host,
                "--port", str(self.port),
                "--output-directory", str(self.dirs["output"]), "--input-directory", str(self.dirs["input"]),
                "--temp-directory", str(self.dirs["temp"]), *self.extra_args]
        if (has_flag(self.tree, "--front-end-root") and "--front-end-root" not in self.extra_args
                and importlib.util.find_spec("comfyui_frontend_package") is None):
            # a current ComfyUI without its frontend package still serves the API with a bare page
            args += ["--front-end-root", str(bare_frontend(self.tree))]
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(args, cwd=self.tree, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True, preexec_fn=die_with_parent)
        log.close()
        return self

    def wait_ready(self, timeout: float = 240) -> "Instance":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/system_stats", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} did not answer within {timeout} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def signal(self, sig: int) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, sig)

    def stop(self) -> None:
        if not self.process or self.process.poll() is not None:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.process.wait(10)

    # --- ComfyUI's HTTP API ------------------------------------------------------------------
    def auth(self) -> dict[str, str]:
        """The shared-secret header an API client sends to the extension's routes."""
        path = self.env.get("COMFYUI_DISTRIBUTED_SECRET_FILE")
        if path and Path(path).exists():
            return {"X-Distributed-Secret": Path(path).read_text().strip()}
        return {}

    def get(self, path: str, **kw):
        headers = {**self.auth(), **kw.pop("headers", {})}  # the extension's routes are read with the secret too
        return requests.get(self.url + path, timeout=kw.pop("timeout", 10), headers=headers, **kw)

    def post(self, path: str, body=None, **kw):
        return self.request("POST", path, body, **kw)

    def request(self, method: str, path: str, body=None, **kw):
        headers = {**self.auth(), **kw.pop("headers", {})}
        return requests.request(method, self.url + path, json=body, timeout=kw.pop("timeout", 30),
                                headers=headers, **kw)

    def queue_prompt(self, prompt: dict) -> str:
        resp = self.post("/prompt", {"prompt": prompt, "client_id": "tests"})
        assert resp.status_code == 200, resp.text
        return resp.json()["prompt_id"]

    def wait_prompt(self, prompt_id: str, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").json().get(prompt_id)
            if entry and (entry.get("status", {}).get("completed") is not None or entry.get("outputs")):
                if entry.get("status", {}).get("status_str") in ("success", "error") or entry.get("outputs"):
                    return entry
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish on {self.name} within {timeout} s\n{self.log_tail()}")

    def timed(self, prompt: dict, timeout: float = 600) -> tuple[float, dict]:
        """Seconds from POST /prompt to a finished history entry (polled finely: benchmarks compare
        differences of tens of milliseconds), and the entry. Raises on an execution error."""
        started = time.perf_counter()
        prompt_id = self.queue_prompt(prompt)
        while time.perf_counter() - started < timeout:
            entry = self.get(f"/history/{prompt_id}").json().get(prompt_id)
            if entry and (entry.get("outputs") or error_of(entry)):
                if error_of(entry):
                    raise RuntimeError(f"prompt failed on {self.name}: {error_of(entry)}")
                return time.perf_counter() - started, entry
            time.sleep(0.01)
        raise TimeoutError(f"prompt {prompt_id} did not finish on {self.name} within {timeout} s")

    def saved_images(self, entry: dict, node_id: str) -> list[np.ndarray]:
        """The images a SaveImage node wrote, as uint8 arrays, in order."""
        images = []
        for item in entry["outputs"][node_id]["images"]:
            path = self.dirs["output"] / item.get("subfolder", "") / item["filename"]
            images.append(np.asarray(Image.open(path).convert("RGB")))
        return images

    def idle(self) -> bool:
        queue = self.get("/queue").json()
        return not queue["queue_running"] and not queue["queue_pending"]


class Cluster:
    """A master and ``workers`` workers on loopback, sharing one config file."""

    def __init__(self, workdir: Path, workers: int = 2, cpu: bool = True):
        self.workdir = workdir
        self.tree = prepare_tree(workdir / "comfyui")
        self.config_path = workdir / "gpu_config.json"
        self.probe_log = workdir / "probe.jsonl"
        self.env = {**os.environ, "COMFYUI_DISTRIBUTED_CONFIG": str(self.config_path),
                    "DISTRIBUTED_TEST_PROBE_LOG": str(self.probe_log), "PYTHONUNBUFFERED": "1",
                    "COMFYUI_DISTRIBUTED_SECRET_FILE": str(workdir / "secret.key"),
                    "DISTRIBUTED_TEST_MEMORY_FILE": str(workdir / "memory.json"),
                    "DISTRIBUTED_TEST_SPEED_FILE": str(workdir / "speeds.json"),
                    "DISTRIBUTED_TEST_PNG_FILE": str(workdir / "png.json"),
                    "DISTRIBUTED_TEST_QUEUE_FILE": str(workdir / "queue6.json")}
        ports = [free_port() for _ in range(workers + 1)]
        self.master = Instance(self.tree, "master", ports[0], workdir, self.env, cpu=cpu)
        self.workers = [Instance(self.tree, f"worker{i + 1}", p, workdir, self.env, cpu=cpu)
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
        write_config(self.config_path, data)
        return data

    def start(self) -> "Cluster":
        for instance in self.instances:
            instance.start()
        for instance in self.instances:
            instance.wait_ready()
        return self

    def wait_checked(self, timeout: float = 60) -> None:
        """Until the master's reachability checks have seen every enabled worker answer (a job
        queued before that plans out a worker still starting)."""
        def every_worker_seen() -> bool:
            rows = self.master.get("/distributed/status").json()["instances"]
            return all(r["state"] in ("online", "busy", "disabled") for r in rows if r["role"] == "worker")
        wait_until(every_worker_seen, timeout, interval=0.25, what="the master's checks seeing every worker")

    def stop(self) -> None:
        for instance in self.instances:
            instance.stop()

    def set_speeds(self, speeds: dict | None = None) -> None:
        """Emulated speed factor per instance name for the probe node; missing names run at 1."""
        ports = {i.name: i.port for i in self.instances}
        (self.workdir / "speeds.json").write_text(json.dumps({str(ports[n]): f for n, f in (speeds or {}).items()}))

    def set_memory(self, most: dict | None = None) -> None:
        """The most images per sampler run each instance (by name) may take before the test nodes
        raise ComfyUI's out-of-memory error, as a GPU would; missing names have no limit."""
        ports = {i.name: i.port for i in self.instances}
        (self.workdir / "memory.json").write_text(json.dumps({str(ports[n]): m for n, m in (most or {}).items()}))

    def probes(self) -> list[dict]:
        if not self.probe_log.exists():
            return []
        return [json.loads(line) for line in self.probe_log.read_text().splitlines() if line.strip()]



def bare_frontend(tree: Path) -> Path:
    path = tree / "bare_frontend"
    path.mkdir(exist_ok=True)
    (path / "index.html").write_text("<!doctype html><title>ComfyUI</title>")
    return path


def error_of(entry: dict) -> str:
    """The execution error message of a finished prompt ('' if it succeeded)."""
    for event, data in entry.get("status", {}).get("messages", []):
        if event == "execution_error":
            return str(data.get("exception_message", ""))
    return ""


def die_with_parent() -> None:
    """In a started instance, before it runs: on Linux, have the kernel end it when the process
    that started it dies, so a test run that is killed leaves no ComfyUI behind."""
    if sys.platform.startswith("linux"):
        import ctypes
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def wait_until(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


# --- workflows -----------------------------------------------------------------------------------

def image_workflow(seed: int = 100, batch: int = 2, size: int = 8, seconds_per_image: float = 0.0,
                   label: str = "") -> dict:
    """Model-free: EmptyImage whose colour comes from Distributed Seed -> probe -> Collector -> SaveImage.

    Each image's blue channel is the low byte of its participant's seed, so order and origin can be read back.
    """
    return {
        "1": {"class_type": "DistributedSeed", "inputs": {"seed": seed}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": size, "height": size, "batch_size": batch,
                                                     "color": ["1", 0]}},
        "3": {"class_type": "DistributedTestProbe", "inputs": {"images": ["2", 0],
                                                               "seconds_per_image": seconds_per_image,
                                                               "label": label}},
        "4": {"class_type": "MultiGPUCollector", "inputs": {"images": ["3", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "dist"}},
    }


def blue_values(images: list[np.ndarray]) -> list[int]:
    return [int(round(float(img[..., 2].mean()))) for img in images]


def write_config(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2))


def split_workflow(batch: int = 10, seconds_per_image: float = 0.0) -> dict:
    """Model-free split mode: Distributed Empty Latent -> a decode stand-in whose colours encode
    each image's global batch index -> probe -> Collector -> SaveImage."""
    return {
        "1": {"class_type": "DistributedEmptyLatent", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "2": {"class_type": "DistributedTestDecode", "inputs": {"samples": ["1", 0]}},
        "3": {"class_type": "DistributedTestProbe", "inputs": {"images": ["2", 0],
                                                               "seconds_per_image": seconds_per_image,
                                                               "label": "split"}},
        "4": {"class_type": "MultiGPUCollector", "inputs": {"images": ["3", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "split"}},
    }


def batch_indices(images: list[np.ndarray]) -> list[int]:
    """Read back the global batch index that DistributedTestDecode painted into each image."""
    return [int(round(float(img[..., 2].mean()))) + 256 * int(round(float(img[..., 1].mean())))
            for img in images]


CHECKPOINT = "sd15-random.safetensors"


def txt2img(latent: dict, steps: int = 2, seed: int = 1234, cfg: float = 7.0) -> dict:
    """A real SD1.5 text-to-image workflow through the Collector; ``latent`` is node "4"."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": latent,
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": seed, "steps": steps,
                                                   "cfg": cfg, "sampler_name": "euler", "scheduler": "normal",
                                                   "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "MultiGPUCollector", "inputs": {"images": ["6", 0]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "ks"}},
    }


def latent(kind: str, size: int, batch: int) -> dict:
    node = {"plain": "EmptyLatentImage", "split": "DistributedEmptyLatent"}[kind]
    return {"class_type": node, "inputs": {"width": size, "height": size, "batch_size": batch}}


def link_checkpoint(tree: Path, built: Path) -> str:
    """Make a built checkpoint visible to a ComfyUI tree; returns its name for the loader."""
    link = tree / "models" / "checkpoints" / CHECKPOINT
    if not link.exists():
        link.symlink_to(built)
    return CHECKPOINT


def build_checkpoint(tree: Path, path: Path) -> Path:
    if not path.exists():
        builder = Path(__file__).resolve().parent / "benchmarks" / "make_checkpoint.py"
        subprocess.run([sys.executable, str(builder), str(tree), str(path)], check=True, timeout=900)
    return path


def emit(figures: dict, out: Path | None = None) -> None:
    """A benchmark's last line: its figures as one JSON object (also written to ``out``)."""
    line = json.dumps(figures)
    print(line)
    if out:
        out.write_text(line + "\n")


def log_size(instance) -> int:
    """How far an instance's log has been written: pass it to log_since to read what follows."""
    try:
        return instance.log_path.stat().st_size
    except OSError:
        return 0


def log_since(instance, offset: int) -> str:
    with open(instance.log_path, "rb") as handle:
        handle.seek(offset)
        return handle.read().decode("utf-8", errors="replace")
