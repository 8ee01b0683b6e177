"""Who renders which work unit.

A work unit has a fixed identity so that the output never depends on which GPU ran it, on timing, or
on failures. In multiply mode a unit is a config slot: unit 0 is the master's, unit ``i + 1`` belongs to
``workers[i]``, and a unit's seed offset is its number. Disabling a worker removes its unit; a worker
that cannot be reached keeps its unit, which another participant renders.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from .config import Config

MASTER_ID = "master"


class PlanError(RuntimeError):
    pass


@dataclass(frozen=True)
class Slot:
    participant: str  # "master" or a worker id
    unit: int


def slots(config: Config) -> list[Slot]:
    """The units of a job, in output order: the master's first, then the workers in config order."""
    result = [Slot(MASTER_ID, 0)] if config.master.enabled else []
    result += [Slot(w.id, i + 1) for i, w in enumerate(config.workers) if w.enabled]
    if not result:
        raise PlanError("Nothing to render on: the master and every worker are disabled. "
                        "Enable at least one in the Distributed panel or in gpu_config.json.")
    return result


def assign(units: dict[str, list[int]], available: list[str]) -> dict[str, list[int]]:
    """Move the units of participants that are not available to those that are.

    Orphaned units go one at a time to the available participant holding the fewest units (ties go
    to the earlier one), so the extra work is spread evenly. Raises PlanError when nobody is left.
    """
    result = {p: list(us) for p, us in units.items() if p in available}
    for p in available:
        result.setdefault(p, [])
    orphans = sorted(u for p, us in units.items() if p not in available for u in us)
    if orphans and not available:
        raise PlanError("no participant is left to render the work")
    for unit in orphans:
        target = min(available, key=lambda p: (len(result[p]), available.index(p)))
        result[target].append(unit)
    return {p: sorted(us) for p, us in result.items() if us}


def seed_for(seed: int, unit: int) -> int:
    """Each unit's seed: the user's seed plus the unit's offset, wrapped like ComfyUI's 64-bit seeds."""
    return (seed + unit) % (1 << 64)


# --- split mode -----------------------------------------------------------------------------------
# One logical batch of N images is divided among the participants by global batch index. A GPU's
# throughput grows with its batch (one H200: 1.03 images/s at batch 1, 2.96 at 4, 4.69 at 8) and
# every prompt pays fixed costs, so each participant gets one contiguous share, in one prompt, in
# proportion to its learned speed: equal GPUs get equal shares.

def proportional(count: int, rates: list[float]) -> list[int]:
    """Split ``count`` items in proportion to ``rates`` (largest remainders; ties to the earlier)."""
    if not rates:
        return []
    weights = [max(0.0, r) for r in rates]
    total = sum(weights)
    if total <= 0:
        weights, total = [1.0] * len(rates), float(len(rates))
    exact = [count * w / total for w in weights]
    sizes = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(rates)), key=lambda i: (-(exact[i] - sizes[i]), i))
    for i in by_remainder[:count - sum(sizes)]:
        sizes[i] += 1
    return sizes


def split_units(units: list[int], participants: list[tuple[str, float]]) -> dict[str, list[int]]:
    """Consecutive slices of ``units`` for (participant, rate) pairs, in their order; a
    participant whose slice would be empty is left out."""
    result: dict[str, list[int]] = {}
    start = 0
    for (participant, _rate), size in zip(participants, proportional(len(units), [r for _p, r in participants])):
        if size:
            result[participant] = units[start:start + size]
        start += size
    return result


def chunks_of(units: list[int]) -> list[list[int]]:
    """[first, count] runs of consecutive units: [3, 4, 5, 9] -> [[3, 3], [9, 1]]."""
    runs: list[list[int]] = []
    for unit in sorted(units):
        if runs and unit == runs[-1][0] + runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([unit, 1])
    return runs


def signature(prompt: dict, nodes) -> str:
    """What a workflow's speed depends on: its node types and numeric settings, not its seeds,
    batch size or prompt text. Rates are learned per signature, since only their ratios between
    participants matter and those hold across reruns of the same workflow."""
    skip = {"seed", "noise_seed", "batch_size"}
    parts = sorted(json.dumps([prompt[n].get("class_type"),
                               {k: v for k, v in (prompt[n].get("inputs") or {}).items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in skip}],
                              sort_keys=True) for n in nodes)
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]


class Throughput:
    """Images per second that each participant has shown on split work, per workflow signature,
    kept across restarts. Unknown participants count as fast as the median of the known ones."""

    SMOOTHING = 0.5
    MAX_SIGNATURES = 200

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()  # the master's own share is measured on another thread
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            self.rates = {str(sig): {str(p): float(r) for p, r in rates.items() if float(r) > 0}
                          for sig, rates in data.items()}
        except (OSError, ValueError, TypeError, AttributeError):
            self.rates = {}

    def rate(self, sig: str, participant: str) -> float:
        known = self.rates.get(sig, {})
        if participant in known:
            return known[participant]
        values = sorted(known.values())
        return values[len(values) // 2] if values else 1.0

    def observe(self, sig: str, participant: str, images: int, seconds: float) -> None:
        if images <= 0 or seconds <= 0:
            return
        measured = images / seconds
        with self._lock:
            known = self.rates.pop(sig, {})
            self.rates[sig] = known  # most recent last, so the oldest go first below
            old = known.get(participant)
            known[participant] = measured if old is None else old + self.SMOOTHING * (measured - old)
            while len(self.rates) > self.MAX_SIGNATURES:
                self.rates.pop(next(iter(self.rates)))
            try:
                tmp = self.path.with_name(self.path.name + ".tmp")
                tmp.write_text(json.dumps(self.rates, indent=1), encoding="utf-8")
                os.replace(tmp, self.path)
            except OSError:
                pass  # losing a measurement is harmless
