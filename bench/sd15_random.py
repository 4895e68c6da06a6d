"""A random-weight model with Stable Diffusion 1.5's architecture (CLIP ViT-L text encoder, the 860M
UNet, the SD VAE), written in the SD folder layout: for GPU benchmarks where no checkpoint can be
fetched. ``python -m bench.sd15_random OUT_DIR [--small] [--lcm]`` (--small: same layout, toy sizes, for a CPU
dry run; --lcm: an LCM-distilled student's layout, its UNet reading a guidance embedding, with LCM's scheduler).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from tests.tiny_models import LCM_SCHEDULER, SD15_SCHEDULER, bpe_tokenizer

# 2 × FLOPs of one SD 1.5 UNet forward for one 64×64×4 latent (multiply-adds counted twice).
SD15_UNET_FLOPS_PER_ROW = 0.803e12


def build(out: Path, small: bool, lcm: bool = False) -> Path:
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = bpe_tokenizer(max_tokens=77)
    tokenizer.save_pretrained(out / "tokenizer")
    hidden = 64 if small else 768
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
            num_hidden_layers=2 if small else 12, num_attention_heads=4 if small else 12, max_position_embeddings=77,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )  # fmt: skip
    text.to(torch.float16).save_pretrained(out / "text_encoder", safe_serialization=True)
    unet = UNet2DConditionModel(
        sample_size=64, cross_attention_dim=hidden, attention_head_dim=8,
        block_out_channels=(32, 64, 64, 64) if small else (320, 640, 1280, 1280), layers_per_block=1 if small else 2,
        norm_num_groups=32, time_cond_proj_dim=256 if lcm else None,
    )  # fmt: skip
    unet.to(torch.float16).save_pretrained(out / "unet", safe_serialization=True)
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 64, 64) if small else (128, 256, 512, 512), layers_per_block=1 if small else 2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
        sample_size=512, scaling_factor=0.18215, norm_num_groups=32,
    )  # fmt: skip
    vae.to(torch.float16).save_pretrained(out / "vae", safe_serialization=True)
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(LCM_SCHEDULER if lcm else SD15_SCHEDULER))
    pipeline = "LatentConsistencyModelPipeline" if lcm else "StableDiffusionPipeline"
    index = {"_class_name": pipeline, "unet": ["diffusers", "UNet2DConditionModel"]}
    (out / "model_index.json").write_text(json.dumps(index))
    (out / "imagegen.json").write_text(json.dumps({"width": 512, "height": 512, "guidance_scale": 1.0 if lcm else 7.5}))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--lcm", action="store_true")
    args = parser.parse_args()
    build(args.out, args.small, args.lcm)
