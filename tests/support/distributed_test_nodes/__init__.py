"""Test-only ComfyUI nodes, installed into custom_nodes by the test harness (never shipped to users).

DistributedTestProbe passes images through after costing a set time, and records when it ran and on
which instance, so tests can see staggering and slow or frozen workers. The time per image can be
scaled per instance with DISTRIBUTED_TEST_SPEED (a factor; 2 means twice as fast), to emulate GPUs of
different speeds honestly: the instance really spends that time.
"""
import json
import os
import time

import comfy.model_management
from comfy.cli_args import args


class DistributedTestProbe:
    CATEGORY = "distributed/testing"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "probe"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",),
                             "seconds_per_image": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 3600.0}),
                             "label": ("STRING", {"default": ""})}}

    @classmethod
    def IS_CHANGED(cls, **_kwargs):
        return float("nan")

    def probe(self, images, seconds_per_image, label):
        started = time.time()
        speed = float(os.environ.get("DISTRIBUTED_TEST_SPEED", "1") or 1)
        cost = seconds_per_image * images.shape[0] / speed
        end = time.monotonic() + cost
        while time.monotonic() < end:
            comfy.model_management.throw_exception_if_processing_interrupted()
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))
        path = os.environ.get("DISTRIBUTED_TEST_PROBE_LOG")
        if path:
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"port": args.port, "label": label, "started": started,
                                         "ended": time.time(), "batch": int(images.shape[0])}) + "\n")
        return (images,)


NODE_CLASS_MAPPINGS = {"DistributedTestProbe": DistributedTestProbe}
