"""Stand-ins for ComfyUI folders of versions that cannot run here: a comfy/cli_args.py that declares a
version's flags (re-created from their names, as ComfyUI 0.38.1 lists them), a comfyui_version.py, and
a main.py that parses them as argparse does and, like 0.38, locks its database at start."""
from __future__ import annotations

from pathlib import Path

# The flags of ComfyUI 0.38.1's comfy/cli_args.py, by name.
FLAGS_038 = """
--listen --port --tls-keyfile --tls-certfile --enable-cors-header --max-upload-size --base-directory
--extra-model-paths-config --output-directory --date-based-output --date-output-format --temp-directory
--input-directory --auto-launch --disable-auto-launch --cuda-device --default-device --cuda-malloc
--disable-cuda-malloc --force-fp32 --force-fp16 --fp32-unet --fp64-unet --bf16-unet --fp16-unet --fp8_e4m3fn-unet
--fp8_e5m2-unet --fp8_e8m0fnu-unet --fp16-vae --fp32-vae --bf16-vae --cpu-vae --fp8_e4m3fn-text-enc
--fp8_e5m2-text-enc --fp16-text-enc --fp32-text-enc --bf16-text-enc --fp16-intermediates --force-channels-last
--directml --oneapi-device-selector --supports-fp8-compute --enable-triton-backend --disable-triton-backend
--preview-method --preview-size --cache-ram --cache-classic --cache-lru --cache-none --high-ram
--use-split-cross-attention --use-quad-cross-attention --use-pytorch-cross-attention --use-sage-attention
--use-flash-attention --use-ck-attention --disable-xformers --force-upcast-attention --dont-upcast-attention
--enable-manager --disable-manager-ui --enable-manager-legacy-ui --gpu-only --highvram --lowvram --novram --cpu
--reserve-vram --vram-headroom --disable-nvml-pressure --async-offload --disable-async-offload
--disable-dynamic-vram --enable-dynamic-vram --fast-disk --disable-fast-disk --disable-cuda-graphs
--disable-comfy-compiler --assert-graph-breaks --force-non-blocking --default-hashing-function
--disable-smart-memory --deterministic --fast --debug-hang --disable-pinned-memory --mmap-torch-files
--disable-mmap --dont-print-server --quick-test-for-ci --windows-standalone-build --disable-metadata
--disable-all-custom-nodes --whitelist-custom-nodes --disabled-nodes-config --disable-partner-nodes --offline
--disable-api-nodes --multi-user --verbose --log-stdout --front-end-version --front-end-root --user-directory
--models-directory --enable-compress-response-body --comfy-api-base --database-url --disable-assets
--enable-assets --enable-asset-hashing --feature-flag --list-feature-flags
""".split()

ONE_VALUE = {"--listen", "--port", "--database-url"}

# A process that answers every GET as ComfyUI's /system_stats would, on `listen`:`port` (both set
# before it), until it is killed.
ANSWERING_SERVER = """
class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"system": {"fake": True}}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
ThreadingHTTPServer((listen, port), Handler).serve_forever()
"""

# Like 0.38: unless the assets system is off, take an exclusive lock beside the database file,
# waiting for none, and exit with ASSETS_STARTUP_FAILED when another instance holds it.
FAKE_MAIN = """
import fcntl, json, os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from comfy.cli_args import args
here = os.path.dirname(os.path.abspath(__file__))
url = args.database_url or "sqlite:///" + os.path.join(here, "user", "comfyui.db")
print("ARGV", json.dumps(sys.argv[1:]), "DATABASE", url, flush=True)
if getattr(args, "disable_assets", None) is None:  # nargs="*": [] when given
    path = url[len("sqlite:///"):]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lock = open(path + ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        print("ASSETS_STARTUP_FAILED: in_use", flush=True)
        sys.exit(1)
    open(path, "a").close()
listen, port = args.listen, int(args.port)
""" + ANSWERING_SERVER


def cli_args_text(flags: list[str]) -> str:
    lines = ["import argparse", "parser = argparse.ArgumentParser()"]
    for flag in flags:
        kind = "" if flag in ONE_VALUE else ', nargs="*"'
        lines.append(f'parser.add_argument("{flag}"{kind})')
    return "\n".join(lines + ["args = parser.parse_args()", ""])


def make_comfyui(root: Path, flags: list[str], version: str = "", main: str = FAKE_MAIN) -> Path:
    """A ComfyUI-shaped folder whose cli_args.py declares ``flags``."""
    (root / "comfy").mkdir(parents=True)
    (root / "comfy" / "__init__.py").write_text("", encoding="utf-8")
    (root / "comfy" / "cli_args.py").write_text(cli_args_text(flags), encoding="utf-8")
    (root / "main.py").write_text(main, encoding="utf-8")
    if version:
        (root / "comfyui_version.py").write_text(f'__version__ = "{version}"\n', encoding="utf-8")
    return root
