"""Who renders which work unit.

A work unit has a fixed identity so that the output never depends on which GPU ran it, on timing, or
on failures. In multiply mode a unit is a config slot: unit 0 is the master's, unit ``i + 1`` belongs to
``workers[i]``, and a unit's seed offset is its number. Disabling a worker removes its unit; a worker
that cannot be reached keeps its unit, which another participant renders.
"""
from __future__ import annotations

from dataclasses import dataclass

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
