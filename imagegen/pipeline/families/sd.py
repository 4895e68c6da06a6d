"""Stable Diffusion 1.x / 2.x: one text encoder (CLIP, or any BERT-like encoder), a UNet, a VAE; VP schedule
with ε-, v- or x0-prediction; CFG with an uncond row, or LCM's guidance embedding on a distilled UNet.

Inpainting checkpoints (``StableDiffusionInpaintPipeline``) have a 9-channel UNet: the latent (4), the mask at
latent size (1) and the masked image's latent (4), concatenated after the input scaling as the pipeline does for
``num_channels_unet == 9``. Those two extra inputs are a row's own conditioning (uncond rows read the same), so
rows of several requests share a forward; the kept region is not blended back (the UNet sees it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import AutoModel, AutoTokenizer, CLIPTextModel

from imagegen.pipeline.components import Decoder, TextEncoder, normalized
from imagegen.pipeline.families.base import (
    Conditioning,
    FamilyDefaults,
    ModelFamily,
    Placement,
    at_latent_size,
    default_sampler,
    vp_samplers,
)
from imagegen.pipeline.folders import load_module, read_json, resolve_component
from imagegen.samplers.guidance import guidance_embedding
from imagegen.samplers.schedules import NoiseSchedule


def load_text_encoder(folder: Path, device: torch.device, dtype: torch.dtype, tokenizer: str = "tokenizer",
                      encoder: str = "text_encoder") -> TextEncoder:  # fmt: skip
    tokenizer_dir, _ = resolve_component(folder / tokenizer)
    encoder_dir, ref = resolve_component(folder / encoder)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    config = read_json(encoder_dir / "config.json")
    is_clip = "CLIPTextModel" in config.get("architectures", []) or config.get("model_type") == "clip_text_model"
    cls: Any = CLIPTextModel if is_clip else AutoModel  # AutoModel picks the class from the config
    model = load_module(cls, encoder_dir, device, dtype)
    limit = int(ref.get("max_length", config.get("max_position_embeddings", 77)))
    use_mask = bool(config.get("use_attention_mask", not is_clip))
    return TextEncoder(tokenizer=tok, model=model, max_length=min(int(tok.model_max_length), limit),
                       use_attention_mask=use_mask)  # fmt: skip


def unet_downsample(unet: UNet2DConditionModel) -> int:
    return int(2 ** (len(unet.config.block_out_channels) - 1))


def check_unet_inputs(unet: UNet2DConditionModel, vae: AutoencoderKL) -> None:
    """A UNet reads the VAE's latent, or (inpainting) the latent, a mask and the masked image's latent."""
    latent, inputs = int(vae.config.latent_channels), int(unet.config.in_channels)
    if inputs not in (latent, 2 * latent + 1):
        raise ValueError(f"a UNet with {inputs} input channels over a {latent}-channel VAE is not served")


class UNetFamily(ModelFamily):
    """What the UNet families (SD, SDXL) share: their latent geometry, inpainting UNets' extra inputs and the
    UNet forward."""

    unet: UNet2DConditionModel
    guidance_embedding_dim: int | None  # LCM-distilled UNets: w enters as an embedding

    @property
    def latent_channels(self) -> int:
        """The VAE's: an inpainting UNet's input has more channels than the latent it denoises."""
        return int(self.decoder.vae.config.latent_channels)

    @property
    def needs_mask(self) -> bool:
        return int(self.unet.config.in_channels) == 2 * self.latent_channels + 1

    @property
    def size_multiple(self) -> int:
        return self.decoder.scale_factor * unet_downsample(self.unet)

    def mask_conditioning(self, pixels: np.ndarray, repaint: torch.Tensor, generator: torch.Generator) -> Conditioning:
        """The mask at latent size and the latent of the image with its repainted pixels zeroed (``image *
        (mask < 0.5)`` in [-1, 1]), its posterior drawn from ``generator`` as ``prepare_mask_latents`` draws it."""
        masked = self.decoder.encode_normalized(normalized(pixels) * (repaint < 0.5), generator)
        device = self.placement.device
        mask = at_latent_size(repaint, masked.shape[-2:])
        return Conditioning({"mask": mask.to(device), "masked_image": masked.to(device)})

    def unet_forward(
        self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: torch.Tensor | None,
        added: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """x (B, C, h, w) the scaled model input; an inpainting UNet gets it with each row's mask and masked-image
        latent, (B, 2C + 1, h, w)."""
        dtype, device = self.unet.dtype, self.unet.device
        if self.needs_mask:
            x = torch.cat([x, cond["mask"].to(x), cond["masked_image"].to(x)], dim=1)
        w_embedding = None
        if self.guidance_embedding_dim is not None and guidance is not None:
            w_embedding = guidance_embedding(guidance, self.guidance_embedding_dim).to(device, dtype)
        out = self.unet(
            x.to(device, dtype),
            t.to(device),
            encoder_hidden_states=cond["context"].to(device, dtype),
            timestep_cond=w_embedding,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        return out.to(torch.float32)


class StableDiffusion(UNetFamily):
    name = "sd"
    pipelines = frozenset(
        {"StableDiffusionPipeline", "StableDiffusionInpaintPipeline", "LatentConsistencyModelPipeline"}
    )

    def __init__(
        self, text_encoder: TextEncoder, unet: UNet2DConditionModel, decoder: Decoder, schedule: NoiseSchedule,
        distilled: bool, placement: Placement,
    ) -> None:  # fmt: skip
        self.text_encoder = text_encoder
        self.unet = unet
        self.decoder = decoder
        self.schedule = schedule
        self.placement = placement
        dim = unet.config.time_cond_proj_dim
        self.guidance_embedding_dim = int(dim) if dim else None  # LCM: w enters as an embedding
        self.guidance = "embedded" if distilled else "cfg"
        self.samplers = vp_samplers(schedule, distilled)
        check_unet_inputs(unet, decoder.vae)

    @classmethod
    def load(cls, folder: Path, index: Mapping[str, Any], placement: Placement) -> StableDiffusion:
        scheduler_cfg = read_json(folder / "scheduler" / "scheduler_config.json")
        unet = load_module(UNet2DConditionModel, folder / "unet", placement.device, placement.dtype)
        vae = load_module(AutoencoderKL, folder / "vae", placement.device, placement.dtype)
        encoder = load_text_encoder(folder, placement.encoder_device, placement.encoder_dtype)
        distilled = bool(unet.config.time_cond_proj_dim) or scheduler_cfg.get("_class_name") == "LCMScheduler"
        return cls(encoder, unet, Decoder(vae), NoiseSchedule.from_config(scheduler_cfg), distilled, placement)

    def defaults(self, scheduler_class: str) -> FamilyDefaults:
        distilled = self.guidance == "embedded"
        fallback = "lcm" if distilled else "ddim"
        side = int(self.unet.config.sample_size) * self.decoder.scale_factor
        return FamilyDefaults(
            sampler="lcm" if distilled else default_sampler(scheduler_class, self.samplers, fallback),
            steps=4 if distilled else 25,
            guidance_scale=8.0 if distilled else 7.5,
            width=side,
            height=side,
        )

    def encode(self, prompts: Sequence[str | None]) -> Conditioning:
        states = self.text_encoder.encode([p or "" for p in prompts])  # SD encodes an absent negative as ""
        return Conditioning({"context": states.to(self.placement.device)})

    @property
    def text_encoders(self) -> tuple[TextEncoder, ...]:
        return (self.text_encoder,)

    @torch.inference_mode()
    def denoise(
        self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: torch.Tensor | None
    ) -> torch.Tensor:
        return self.unet_forward(x, t, cond, guidance)
