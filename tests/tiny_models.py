"""Tiny random-weight models in the standard Stable Diffusion folder layout, built by the tests.

Same classes and files as a real SD checkpoint (CLIPTextModel + BPE tokenizer, UNet2DConditionModel,
AutoencoderKL, scheduler_config.json, model_index.json, safetensors), a few hundred kB each.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

CORPUS = [
    "a red mug on a white background",
    "product photo of a blue t-shirt",
    "a green bottle on grey",
    "studio shot of a yellow chair",
    "a black lamp",
    "white sneaker on a wooden table",
    "orange backpack",
]
HIDDEN = 32
MAX_TOKENS = 16

SD15_SCHEDULER = {  # the shape of Stable Diffusion 1.5's scheduler_config.json
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "clip_sample": False,
}
V_PRED_SCHEDULER = {  # v-prediction with zero terminal SNR and trailing timesteps (Lin et al. 2023)
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
    "steps_offset": 0,
    "clip_sample": False,
    "set_alpha_to_one": False,
}
LCM_SCHEDULER = {
    "_class_name": "LCMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "original_inference_steps": 50,
    "timestep_scaling": 10.0,
    "set_alpha_to_one": True,
    "clip_sample": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def bpe_tokenizer(max_tokens: int = MAX_TOKENS) -> PreTrainedTokenizerFast:
    """A small BPE tokenizer trained on a few captions, saved in the fast-tokenizer format."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "<unk>", "<s>", "</s>"])
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=max_tokens,
    )


def build_tiny_model(
    folder: Path,
    scheduler: dict[str, Any],
    *,
    time_cond_proj_dim: int | None = None,
    seed: int = 0,
    defaults: dict[str, Any] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Path:
    """Write a random-weight SD-layout model to ``folder`` and return it (``tokenizer``: the small BPE one by
    default; the text encoder's vocabulary and context follow it)."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or bpe_tokenizer()
    tokenizer.save_pretrained(folder / "tokenizer")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=HIDDEN,
        attention_head_dim=4,
        norm_num_groups=8,
        time_cond_proj_dim=time_cond_proj_dim,
    )
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=4,
        sample_size=16,
    )
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    pipeline = "LatentConsistencyModelPipeline" if time_cond_proj_dim else "StableDiffusionPipeline"
    index = {
        "_class_name": pipeline,
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", type(tokenizer).__name__],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", scheduler["_class_name"]],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    if defaults:
        (folder / "imagegen.json").write_text(json.dumps(defaults))
    return folder


def build_tiny_models(root: Path) -> dict[str, Path]:
    """The three models the tests use: epsilon (SD 1.5 schedule), v-prediction, and an LCM-style UNet."""
    return {
        "tiny-eps": build_tiny_model(root / "tiny-eps", SD15_SCHEDULER, seed=1),
        "tiny-v": build_tiny_model(root / "tiny-v", V_PRED_SCHEDULER, seed=2),
        "tiny-lcm": build_tiny_model(root / "tiny-lcm", LCM_SCHEDULER, time_cond_proj_dim=16, seed=3),
    }


def build_tiny_inpainting_model(folder: Path, scheduler: dict[str, Any], *, seed: int = 0) -> Path:
    """A tiny SD inpainting checkpoint (``StableDiffusionInpaintPipeline``, as stable-diffusion-inpainting): the
    tiny SD folder with its UNet replaced by one of the same config reading 9 channels (latent, mask, masked
    image's latent), random weights."""
    build_tiny_model(folder, scheduler, seed=seed)
    config = dict(UNet2DConditionModel.load_config(folder / "unet"))
    torch.manual_seed(seed + 1000)
    UNet2DConditionModel.from_config({**config, "in_channels": 9}).save_pretrained(
        folder / "unet", safe_serialization=True
    )
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionInpaintPipeline"}))
    return folder
