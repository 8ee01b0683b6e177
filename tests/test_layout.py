"""The shape of the code, checked on its source: the core imports no ComfyUI module, its modules
import each other without a cycle, and the glue's nodes do not import its routes (both are given
the one runtime object by the entry point)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "distributed_core"
COMFY_MODULES = {"comfy", "comfy_api", "comfy_execution", "folder_paths", "server", "execution", "nodes",
                 "latent_preview", "node_helpers", "comfy_extras"}


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(modules of this package it imports, absolute top-level modules it imports), lazy ones too."""
    inner, outer = set(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            if node.module:
                inner.add(node.module.split(".")[-1] if node.level == 1 else node.module.split(".")[0])
            else:
                inner.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            outer.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            outer.update(alias.name.split(".")[0] for alias in node.names)
    return inner, outer


def test_the_core_imports_no_comfyui_module():
    found = {path.name: sorted(_imports(path)[1] & COMFY_MODULES) for path in CORE.glob("*.py")}
    assert {name: mods for name, mods in found.items() if mods} == {}


def test_the_core_modules_import_each_other_without_a_cycle():
    graph = {path.stem: {m for m in _imports(path)[0] if (CORE / f"{m}.py").exists()} for path in CORE.glob("*.py")}
    assert len(graph) > 20 and graph["runtime"] >= {"fleet", "collector_jobs", "upscale", "spread_queue"}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph[module]):
            assert state.get(dep) != "open", f"import cycle: {' -> '.join(path + [dep])}"
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = "done"
    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_kinds_of_job_use_the_fleet_and_never_each_other():
    kinds = {"collector_jobs", "upscale", "spread_queue"}
    for kind in kinds:
        inner = _imports(CORE / f"{kind}.py")[0]
        assert "fleet" in inner and not inner & (kinds - {kind}), (kind, sorted(inner))
    assert not _imports(CORE / "fleet.py")[0] & kinds


def test_the_nodes_do_not_import_the_routes():
    inner, _outer = _imports(ROOT / "nodes.py")
    assert "distributed_routes" not in inner and "distributed_core" in inner
