"""Try ComfyUI-Distributed from a fresh clone: `python3 -m distributed_core.demo`.

Builds (once) an environment with a real ComfyUI, starts a master and workers from gpu_config.json
through the launcher (CPU instances when the machine has no NVIDIA GPU), runs the bundled example
workflow through the Multi-GPU Collector, prints where the images were saved, and stops everything.
Inside an existing ComfyUI (this folder in its custom_nodes, or COMFYUI_ROOT) it uses that one.
Extra arguments go to the launcher (see `./launch_distributed.sh --help`).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

from . import sandbox
from .config import EXTENSION_DIR


def main(argv: list[str]) -> int:
    in_comfyui = (EXTENSION_DIR.parent.name == "custom_nodes"
                  and (EXTENSION_DIR.parent.parent / "main.py").exists())
    args = list(argv)
    if in_comfyui or os.environ.get("COMFYUI_ROOT"):
        python = sys.executable
    else:
        python = sandbox.build_env()
        tree = sandbox.prepare_tree(sandbox.bundled_comfyui(python), sandbox.CACHE / "demo-comfyui")
        sandbox.say(f"using the ComfyUI copy at {tree}")
        args = ["--comfyui", str(tree), *args]
    if shutil.which("nvidia-smi") is None and "--cpu" not in args:
        sandbox.say("no NVIDIA GPU found: running CPU instances with a model-free example")
        args.append("--cpu")
    command = [str(python), str(EXTENSION_DIR / "distributed_core" / "launcher.py"), "--example", *args]
    return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
