"""Test-only ComfyUI nodes, installed into custom_nodes by the test harness (never shipped to users).

DistributedTestProbe passes images through after costing a set time, and records when it ran and on
which instance, so tests can see staggering and slow or frozen workers. The time per image is
divided by the instance's speed factor (2 means twice as fast), read at every call from the JSON file
named by DISTRIBUTED_TEST_SPEED_FILE ({"<port>": factor}), to emulate GPUs of different speeds
honestly: the instance really spends that time.
"""
import json
import os
import time

import comfy.model_management
import comfy.utils
from comfy.cli_args import args


PROBE_STEPS = 10  # a probe that takes time tells its progress in this many steps


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
        speed = 1.0
        speed_file = os.environ.get("DISTRIBUTED_TEST_SPEED_FILE")
        if speed_file and os.path.exists(speed_file):
            with open(speed_file, encoding="utf-8") as handle:
                speed = float(json.load(handle).get(str(args.port), 1.0))
        cost = seconds_per_image * images.shape[0] / speed
        begun = time.monotonic()
        end = begun + cost
        steps = comfy.utils.ProgressBar(PROBE_STEPS) if cost > 0 else None  # progress as a sampler tells it
        while time.monotonic() < end:
            comfy.model_management.throw_exception_if_processing_interrupted()
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))
            if steps is not None:
                steps.update_absolute(min(PROBE_STEPS, int(PROBE_STEPS * (time.monotonic() - begun) / cost)), PROBE_STEPS)
        path = os.environ.get("DISTRIBUTED_TEST_PROBE_LOG")
        if path:
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"port": args.port, "label": label, "started": started,
                                         "ended": time.time(), "batch": int(images.shape[0])}) + "\n")
        return (images,)


NODE_CLASS_MAPPINGS = {"DistributedTestProbe": DistributedTestProbe}


def _simulate_gpu_memory() -> None:
    """Test-only: when DISTRIBUTED_TEST_MEMORY_FILE is set, ComfyUI's sampler raises the out-of-memory
    error that a GPU would for a batch larger than the file gives for this instance ({"<port>": most
    images per sampler run}; an instance not named there samples anything). The file is read at
    every call, so that a test can set and clear the limit while the servers run."""
    path = os.environ.get("DISTRIBUTED_TEST_MEMORY_FILE")
    if not path:
        return
    import comfy.sample

    sample = comfy.sample.sample

    def limited(model, noise, *rest, **kwargs):
        most = None
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                most = json.load(handle).get(str(args.port))
        if most is not None and noise.shape[0] > most:
            raise comfy.model_management.OOM_EXCEPTION(
                f"simulated: a batch of {noise.shape[0]} does not fit (the test allows {most})")
        return sample(model, noise, *rest, **kwargs)

    comfy.sample.sample = limited


_simulate_gpu_memory()


class DistributedTestDecode:
    """A model-free stand-in for VAE Decode: one 8x8 image per latent, whose colour encodes the
    image's global batch index (blue: low byte, green: high byte), so tests can read order back."""

    CATEGORY = "distributed/testing"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    def decode(self, samples):
        import torch
        count = samples["samples"].shape[0]
        indices = samples.get("batch_index") or list(range(count))
        images = torch.zeros([count, 8, 8, 3])
        for i, index in enumerate(indices):
            images[i, :, :, 2] = (index & 0xFF) / 255.0
            images[i, :, :, 1] = ((index >> 8) & 0xFF) / 255.0
        return (images,)


NODE_CLASS_MAPPINGS["DistributedTestDecode"] = DistributedTestDecode


class DistributedTestNeedsCheckpoint:
    """Passes images through, but names a checkpoint from the instance's own list (as a loader's
    ckpt_name does), so tests can give the master a model that a worker lacks without loading it."""

    CATEGORY = "distributed/testing"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths
        return {"required": {"images": ("IMAGE",),
                             "ckpt_name": (folder_paths.get_filename_list("checkpoints"),)}}

    def run(self, images, ckpt_name):
        return (images,)


NODE_CLASS_MAPPINGS["DistributedTestNeedsCheckpoint"] = DistributedTestNeedsCheckpoint


class DistributedTestFail:
    """Raises at run time (validation passes), with the message given: a prompt that fails where it runs."""

    CATEGORY = "distributed/testing"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "fail"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "message": ("STRING", {"default": "test failure"})}}

    def fail(self, images, message):
        raise RuntimeError(message)


class DistributedTestAudio:
    """A model-free AUDIO value (ComfyUI's shape: waveform [batch, channels, samples], sample_rate)
    whose samples depend on the seed, so tests can check what arrived bit for bit. With a latent,
    one stretch of ``samples`` per image of the latent, seeded by seed + the image's global batch
    index (as split mode tags it), one after another in time."""

    CATEGORY = "distributed/testing"
    RETURN_TYPES = ("AUDIO",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 1 << 31}),
                             "samples": ("INT", {"default": 4800, "min": 1, "max": 1 << 22})},
                "optional": {"sample_rate": ("INT", {"default": 24000, "min": 1, "max": 1 << 22}),
                             "latent": ("LATENT",)}}

    def make(self, seed, samples, sample_rate=24000, latent=None):
        import torch
        if latent is None:
            seeds = [seed]
        else:
            count = latent["samples"].shape[0]
            seeds = [seed + index for index in (latent.get("batch_index") or list(range(count)))]
        parts = [torch.rand([1, 2, samples], generator=torch.Generator().manual_seed(s)) * 2 - 1 for s in seeds]
        return ({"waveform": torch.cat(parts, dim=2), "sample_rate": int(sample_rate)},)


class DistributedTestSaveValue:
    """An output node that writes what it is given (a tensor, or a dict of them) to the output
    folder with torch.save, for tests to compare exactly."""

    CATEGORY = "distributed/testing"
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"filename": ("STRING", {"default": "value"})},
                "optional": {"audio": ("AUDIO",), "latent": ("LATENT",), "mask": ("MASK",)}}

    def save(self, filename, **values):
        import torch

        import folder_paths
        path = os.path.join(folder_paths.get_output_directory(), f"{filename}.pt")
        torch.save(values, path)
        return {"ui": {"values": [{"filename": f"{filename}.pt", "port": args.port}]}}


NODE_CLASS_MAPPINGS.update({"DistributedTestFail": DistributedTestFail, "DistributedTestAudio": DistributedTestAudio,
                            "DistributedTestSaveValue": DistributedTestSaveValue})


def _slow_png_saves() -> None:
    """Pillow's PNG writer, made slow (or failing) on the instances named in the JSON file
    DISTRIBUTED_TEST_PNG_FILE ({"<port>": seconds}; a negative number fails the write as a full
    disk would), read at every save: tests can watch a file being written behind."""
    path = os.environ.get("DISTRIBUTED_TEST_PNG_FILE")
    if not path:
        return
    from PIL import Image

    Image.init()
    original = Image.SAVE["PNG"]

    def save(image, fp, filename, *rest, **kwargs):
        seconds = 0.0
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                seconds = float(json.load(handle).get(str(args.port), 0.0))
        if seconds < 0:
            raise OSError(28, "No space left on device (a test's stand-in)")
        time.sleep(seconds)
        return original(image, fp, filename, *rest, **kwargs)

    Image.SAVE["PNG"] = save


_slow_png_saves()


def _six_field_queue() -> None:
    """ComfyUI 0.38's queue items, re-created on an older ComfyUI: while the file named by
    DISTRIBUTED_TEST_QUEUE_FILE exists, each item put on the queue gets a sixth field (0.38's
    sensitive data, which its prompt worker reads as item[5]). Every item the execution thread is
    handed (through whatever get the extensions installed) is then written to that file's log
    (the file name plus ".log"): its prompt id and how many fields it had, so a test sees whether a
    six-field item reached the prompt worker with its sixth field, as 0.38 needs."""
    path = os.environ.get("DISTRIBUTED_TEST_QUEUE_FILE")
    if not path:
        return
    from server import PromptServer

    server = PromptServer.instance
    queue = server.prompt_queue
    put_with_six: set[str] = set()
    original_put = queue.put

    def put(item):
        if os.path.exists(path):
            item = tuple(item) + ({"test_sensitive": str(item[1])},)
            put_with_six.add(str(item[1]))
        return original_put(item)
    queue.put = put

    async def wrap_get(_app):  # once every extension has put its own get in place
        installed = queue.get

        def get(*args, **kwargs):
            got = installed(*args, **kwargs)
            if got is not None and str(got[0][1]) in put_with_six:
                item = got[0]
                put_with_six.discard(str(item[1]))
                sixth = item[5] if len(item) > 5 else None
                with open(path + ".log", "a", encoding="utf-8") as handle:
                    handle.write(json.dumps({"prompt_id": str(item[1]), "fields": len(item),
                                             "sixth_kept": sixth == {"test_sensitive": str(item[1])}}) + "\n")
            return got
        queue.get = get
    server.app.on_startup.append(wrap_get)


_six_field_queue()
