"""The bundled example: a model-free workflow through the Multi-GPU Collector, queued on a master
like any API client would, with the saved images printed at the end. Runs on CPU instances too."""
from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path

from .config import EXTENSION_DIR

TEMPLATE = EXTENSION_DIR / "example_workflows" / "Multi-GPU Collector - a colour per GPU.json"

# The same graph as the template above, in ComfyUI's API format. Each participant's colour is its
# seed read as 0xRRGGBB (EmptyImage keeps the low 24 bits): seed + slot x step, with a step chosen so
# that the first eight slots differ strongly (teal, red, ochre, green, blue, aqua, pink, lime).
SEED, STEP = 0x248457, 0xCD7DE3
PROMPT = {
    "1": {"class_type": "DistributedSeed", "inputs": {"seed": SEED, "step": STEP}},
    "2": {"class_type": "EmptyImage", "inputs": {"width": 256, "height": 256, "batch_size": 2,
                                                 "color": ["1", 0]}},
    "3": {"class_type": "MultiGPUCollector", "inputs": {"images": ["2", 0]}},
    "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "distributed_example"}},
}


def _call(url: str, body: dict | None = None, timeout: float = 30) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return json.loads(resp.read() or b"{}")


def run(master_url: str, output_dir: Path | None = None, timeout: float = 600) -> int:
    master_url = master_url.rstrip("/")
    print(f"Queueing the example workflow on {master_url} ...", flush=True)
    prompt_id = _call(master_url + "/prompt", {"prompt": PROMPT, "client_id": "distributed-example"})["prompt_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = _call(f"{master_url}/history/{prompt_id}").get(prompt_id)
        status = (entry or {}).get("status") or {}
        if status.get("status_str") == "error":
            for event, data in status.get("messages", []):
                if event == "execution_error":
                    print(f"The example failed: {data.get('exception_message', '').strip()}", file=sys.stderr)
            return 1
        if entry and entry.get("outputs"):
            images = entry["outputs"]["4"]["images"]
            where = output_dir or Path("<ComfyUI output folder>")
            print(f"Done: the Collector combined {len(images)} images from every GPU. Saved:")
            for image in images:
                print(f"  {where / image.get('subfolder', '') / image['filename']}")
            return 0
        time.sleep(0.5)
    print(f"The example did not finish within {timeout:.0f} s", file=sys.stderr)
    return 1
