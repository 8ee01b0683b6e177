"""Which CPU cores each local ComfyUI instance may use, and how many threads its pools get.

Left alone, every torch process sizes its thread pools to all the cores of the machine, so instances
on separate GPUs still fight over the CPU and slow each other down (two instances on two GPUs took
2.17 s for a pair of prompts that one alone renders in 1.43 s; with the cores split, 1.29 s). The
launcher therefore gives every local instance of the config a disjoint set of cores, on its GPU's
NUMA node where the machine tells which that is, and caps the OpenMP, MKL and torch pools to match.
A config entry's ``cpus`` (``"0-7,16-23"``, or ``"off"``) and ``threads`` override the automatic choice.

Pure logic and /sys reads; no ComfyUI import.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

SYS = Path("/sys")
OFF = "off"
# Thread pools a ComfyUI process sizes from these (torch's intra-op pool follows OMP_NUM_THREADS).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
_CPULIST = re.compile(r"^\s*\d+(\s*-\s*\d+)?(\s*,\s*\d+(\s*-\s*\d+)?)*\s*$")


class CpuListError(ValueError):
    pass


def parse_cpulist(text: str) -> list[int]:
    """``"0-3,8"`` -> [0, 1, 2, 3, 8] (Linux's cpulist format, as in /sys and taskset -c)."""
    if not isinstance(text, str) or not _CPULIST.match(text):
        raise CpuListError(f"{text!r} is not a list of CPU numbers such as \"0-7,16-23\"")
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        lo, hi = int(first), int(last or first)
        if hi < lo or hi > 8191:
            raise CpuListError(f"{part.strip()!r}: a range runs from low to high, CPUs 0 to 8191")
        cpus.update(range(lo, hi + 1))
    return sorted(cpus)


def format_cpulist(cpus: list[int]) -> str:
    """[0, 1, 2, 3, 8] -> ``"0-3,8"``."""
    runs: list[list[int]] = []
    for cpu in sorted(set(cpus)):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


@dataclass(frozen=True)
class Machine:
    """What the allocation needs to know about this machine."""
    cpus: tuple[int, ...]                              # the CPUs this process may use
    cores: tuple[tuple[int, ...], ...] = ()            # hyperthread siblings that share one core
    numa: tuple[tuple[int, tuple[int, ...]], ...] = ()  # (node, its CPUs)
    gpu_nodes: tuple[tuple[int, int], ...] = ()        # (GPU index as nvidia-smi numbers it, NUMA node)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def probe(gpu_bus_ids: dict[int, str] | None = None, root: Path = SYS) -> Machine:
    """This machine's CPUs, cores and NUMA nodes from /sys; the GPUs' nodes from their PCI bus ids
    (``nvidia-smi --query-gpu=index,pci.bus_id``). Anything unreadable is simply left out."""
    if hasattr(os, "sched_getaffinity"):
        usable = sorted(os.sched_getaffinity(0))
    else:
        usable = list(range(os.cpu_count() or 1))
    cores: set[tuple[int, ...]] = set()
    for cpu in usable:
        text = _read(root / f"devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            siblings = parse_cpulist(text) if text else [cpu]
        except CpuListError:
            siblings = [cpu]
        cores.add(tuple(c for c in siblings if c in usable) or (cpu,))
    numa = []
    for node_dir in sorted((root / "devices/system/node").glob("node[0-9]*")):
        text = _read(node_dir / "cpulist")
        try:
            node_cpus = tuple(c for c in parse_cpulist(text) if c in usable) if text else ()
        except CpuListError:
            continue
        if node_cpus:
            numa.append((int(node_dir.name[4:]), node_cpus))
    gpu_nodes = []
    for index, bus_id in (gpu_bus_ids or {}).items():
        # nvidia-smi prints 00000000:18:00.0; sysfs names it 0000:18:00.0
        domain, _, rest = bus_id.strip().lower().partition(":")
        text = _read(root / f"bus/pci/devices/{domain[-4:]}:{rest}/numa_node")
        if text and text.lstrip("-").isdigit() and int(text) >= 0:
            gpu_nodes.append((index, int(text)))
    return Machine(tuple(usable), tuple(sorted(cores)), tuple(numa), tuple(gpu_nodes))


def _slices(cores: list[tuple[int, ...]], parts: int) -> list[list[tuple[int, ...]]]:
    """Split whole cores into ``parts`` runs as equal as can be, the first ones larger."""
    size, extra = divmod(len(cores), parts)
    result, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        result.append(cores[start:end])
        start = end
    return result


def allocate(instances: list[tuple[str, int | None]], machine: Machine) -> dict[str, list[int]]:
    """Disjoint CPU sets for instances given as (id, GPU index or None), in config order.

    Whole cores (with their hyperthread siblings) are handed out, so two instances never share
    one. Where every instance's GPU sits on a known NUMA node that has a core for each instance
    there, each node's cores are split among its own instances; otherwise all cores are split in
    order. With fewer cores than instances nobody is pinned ({}), since a shared core is no worse
    than a forced one.
    """
    if not instances:
        return {}
    usable = set(machine.cpus)
    cores = sorted(c for c in (machine.cores or tuple((cpu,) for cpu in machine.cpus)) if set(c) <= usable)
    if len(cores) < len(instances):
        return {}
    node_cpus = {node: set(cpus) for node, cpus in machine.numa}
    gpu_node = dict(machine.gpu_nodes)
    nodes = [gpu_node.get(device) if device is not None else None for _id, device in instances]
    groups: dict[int | None, list[str]] = {}
    if all(node in node_cpus for node in nodes):
        for (instance_id, _device), node in zip(instances, nodes):
            groups.setdefault(node, []).append(instance_id)
        pools = {node: [c for c in cores if set(c) <= node_cpus[node]] for node in groups}
        if any(len(pools[node]) < len(ids) for node, ids in groups.items()):
            groups = {}
    if not groups:
        groups, pools = {None: [i for i, _d in instances]}, {None: cores}
    result: dict[str, list[int]] = {}
    for node, ids in groups.items():
        for instance_id, part in zip(ids, _slices(pools[node], len(ids))):
            result[instance_id] = sorted(cpu for core in part for cpu in core)
    return result


def threads_for(cpus: list[int], machine: Machine) -> int:
    """One pool thread per whole core in the set (hyperthread siblings add little to torch)."""
    cores = {core for core in machine.cores if set(core) & set(cpus)}
    return max(1, len(cores) or len(cpus))


def thread_env(threads: int) -> dict[str, str]:
    return {name: str(threads) for name in THREAD_VARIABLES}
