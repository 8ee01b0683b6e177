"""NVIDIA GPU detection through nvidia-smi, and the config a fresh machine starts with."""
from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

NVIDIA_SMI_QUERY = ["--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"]
MASTER_PORT = 8188
CPU_WORKER_COUNT = 2


def parse_nvidia_smi(output: str) -> list[dict[str, Any]]:
    """Parse ``index, name, memory.total`` CSV lines; lines that do not fit are skipped."""
    gpus: list[dict[str, Any]] = []
    for line in output.splitlines():
        if line.count(",") < 2:
            continue
        # A GPU name may itself hold a comma: index is the first field, memory the last.
        index_text, rest = line.split(",", 1)
        name, memory_text = rest.rsplit(",", 1)
        try:
            index = int(index_text)
            vram_total_mb = int(float(memory_text))
        except (ValueError, OverflowError):  # e.g. "[N/A]" or a header line
            continue
        gpus.append({"index": index, "name": name.strip(), "vram_total_mb": vram_total_mb})
    return sorted(gpus, key=lambda gpu: gpu["index"])


def detect_gpus(timeout: float = 15.0) -> list[dict[str, Any]]:
    """The NVIDIA GPUs of this machine as ``{index, name, vram_total_mb}``; [] without nvidia-smi."""
    executable = shutil.which("nvidia-smi")
    if not executable:
        return []
    try:
        result = subprocess.run([executable, *NVIDIA_SMI_QUERY], capture_output=True, text=True,
                                timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    if result.returncode != 0:  # e.g. a driver/library version mismatch
        return []
    return parse_nvidia_smi(result.stdout)


BUS_ID = re.compile(r"^\s*(\d+)\s*,\s*([0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-7])\s*$")


def parse_bus_ids(output: str) -> dict[int, str]:
    """``index, pci.bus_id`` CSV lines -> {index: bus id}; other lines are skipped."""
    found = (BUS_ID.match(line) for line in output.splitlines())
    return {int(m.group(1)): m.group(2) for m in found if m}


def detect_bus_ids(timeout: float = 15.0) -> dict[int, str]:
    """Each NVIDIA GPU's PCI bus id, which tells its NUMA node (see cpus.probe); {} without nvidia-smi."""
    executable = shutil.which("nvidia-smi")
    if not executable:
        return {}
    try:
        result = subprocess.run([executable, "--query-gpu=index,pci.bus_id", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return {}
    return parse_bus_ids(result.stdout) if result.returncode == 0 else {}


def config_from_gpus(gpus: list[dict[str, Any]]) -> dict[str, Any]:
    """Master on the first GPU, one worker per further GPU; without a GPU, a CPU setup to try things."""
    if not gpus:
        workers = [{"id": f"worker{n}", "name": f"CPU worker {n}", "host": "127.0.0.1",
                    "port": MASTER_PORT + n, "device": None, "enabled": True, "extra_args": "--cpu"}
                   for n in range(1, CPU_WORKER_COUNT + 1)]
        master_device, master_args = None, "--cpu"
    else:
        workers = [{"id": f"worker{n}", "name": f"GPU {gpu['index']}", "host": "127.0.0.1",
                    "port": MASTER_PORT + n, "device": gpu["index"], "enabled": True, "extra_args": ""}
                   for n, gpu in enumerate(gpus[1:], start=1)]
        master_device, master_args = gpus[0]["index"], ""
    return {
        "master": {"port": MASTER_PORT, "device": master_device, "enabled": True, "extra_args": master_args},
        "workers": workers,
        "settings": {"stagger_delay": 2.0, "job_timeout": 120, "mode": "parallel"},
    }


def describe_gpus(gpus: list[dict[str, Any]]) -> str:
    if not gpus:
        return ("No NVIDIA GPU found (nvidia-smi missing, failing or listing none): a CPU setup, the master "
                f"and {CPU_WORKER_COUNT} workers on --cpu, lets you try things out.")
    lines = [f"Found {len(gpus)} NVIDIA GPU{'s' if len(gpus) != 1 else ''}:"]
    lines += [f"  GPU {gpu['index']}: {gpu['name']} ({gpu['vram_total_mb'] / 1024:.1f} GiB VRAM)"
              for gpu in gpus]
    return "\n".join(lines)
