"""Build a checkpoint with Stable Diffusion 1.5's exact shapes and random weights, from ComfyUI's
own classes, so that tests and GPU benchmarks cost what SD1.5 costs without downloading anything.

    python tests/benchmarks/make_checkpoint.py COMFYUI_ROOT OUT.safetensors

Run it with the Python that runs that ComfyUI. CheckpointLoaderSimple loads the result as SD1.5
(1.07 B parameters, 2.1 GB in fp16); its images are noise. Weights are N(0, 0.02), 1-D weights 1 and
biases 0, from a fixed seed, so every build is the same.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

# The shapes of SD1.5 (as ComfyUI's model detection describes them).
UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
        "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
        "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_temporal_attention": False, "use_temporal_resblock": False}
VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
       "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def build(comfy_root: Path, out: Path) -> None:
    sys.path.insert(0, str(comfy_root))
    os.chdir(comfy_root)
    import torch
    from safetensors.torch import save_file

    from comfy.cli_args import args
    if not torch.cuda.is_available():  # otherwise ComfyUI's model management looks for a GPU
        args.cpu = True
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.sd1_clip import SDClipModel

    generator = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    parts = {"model.diffusion_model.": lambda: UNetModel(**UNET, dtype=torch.float16),
             "first_stage_model.": lambda: AutoencoderKL(ddconfig=VAE, embed_dim=4),
             "cond_stage_model.": lambda: SDClipModel(device="cpu")}
    with torch.no_grad():
        for prefix, make in parts.items():
            module = make()
            for name, value in module.state_dict().items():
                if not value.is_floating_point():
                    tensors[prefix + name] = value.clone()
                    continue
                fresh = torch.empty(value.shape, dtype=torch.float32)
                if name.endswith("bias"):
                    fresh.zero_()
                elif fresh.dim() == 1:
                    fresh.fill_(1.0)
                else:
                    fresh.normal_(0.0, 0.02, generator=generator)
                tensors[prefix + name] = fresh.half()
            del module
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, out)
    count = sum(t.numel() for t in tensors.values())
    print(f"wrote {out}: {count / 1e9:.2f} B parameters, {out.stat().st_size / 2**30:.2f} GiB")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__)
        sys.exit(2)
    build(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve())
