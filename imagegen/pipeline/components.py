"""Thin typed wrappers over the text encoders and VAEs the model families share.

Latents stay float32 between steps whatever the model dtype: the sampler arithmetic is done in fp32
and only the networks run in fp16/bf16 on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True, eq=False)
class TextEncoder:
    tokenizer: PreTrainedTokenizerBase
    model: PreTrainedModel
    max_length: int
    use_attention_mask: bool  # CLIP as in SD: no mask; BERT-like encoders were trained with one

    def _tokens(self, prompts: list[str]) -> Any:
        """Prompts padded to ``max_length``, as the diffusers pipelines pad them."""
        return self.tokenizer(
            prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )

    def _run(self, prompts: list[str], **kwargs: bool) -> Any:
        tokens = self._tokens(prompts)
        device = self.model.device
        mask = tokens.attention_mask.to(device) if self.use_attention_mask else None
        return self.model(tokens.input_ids.to(device), attention_mask=mask, **kwargs)

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Token-level states (B, L, D): the last hidden states."""
        return self._run(prompts)[0]

    @torch.inference_mode()
    def penultimate_and_first(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL's and SD3's reading of a CLIP tower: the penultimate hidden states (B, L, D) and the first
        output — a CLIPTextModelWithProjection's projected pooled embedding (B, P)."""
        out = self._run(prompts, output_hidden_states=True)
        return out.hidden_states[-2], out[0]

    @torch.inference_mode()
    def states_and_mean(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """A sentence encoder's reading: token states (B, L, D) and their mean over each prompt's own tokens
        (B, D), the sentence embedding of sentence-transformers' mean pooling (all-MiniLM-L6-v2's)."""
        tokens = self._tokens(prompts)
        device = self.model.device
        mask = tokens.attention_mask.to(device)
        states = self.model(tokens.input_ids.to(device), attention_mask=mask)[0]
        weights = mask.unsqueeze(-1).to(states.dtype)
        return states, (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)

    @torch.inference_mode()
    def pooled(self, prompts: list[str]) -> torch.Tensor:
        """CLIPTextModel's ``pooler_output`` (B, D): the state at the end token (Flux's pooled conditioning)."""
        return self._run(prompts).pooler_output

    def count_tokens(self, prompt: str) -> int:
        """The prompt's tokens this encoder reads, specials excluded, up to its ``max_length``."""
        ids = self.tokenizer(prompt, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        specials = len(self.tokenizer("", truncation=False, verbose=False)["input_ids"])
        return min(len(ids), self.max_length - specials)

    def read_back(self, prompt: str) -> str:
        """The prompt as this encoder reads it: its tokenizer's round trip (normalised, without specials)."""
        ids = self.tokenizer(prompt, truncation=False, verbose=False)["input_ids"]
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))


def normalized(pixels: np.ndarray) -> torch.Tensor:
    """An image (H, W, 3) uint8 → (1, 3, H, W) float32 in [-1, 1], as diffusers' image processor makes it."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None].to(torch.float32) / 255 * 2 - 1


@dataclass(frozen=True, eq=False)
class Decoder:
    vae: AutoencoderKL

    def prepare(self, decode_dtype: torch.dtype | None) -> None:
        """Convolutions in channels_last (decodes ~1.4× faster on a CPU, the same pixels up to rounding), and the
        decoding half (post-quant conv and decoder) in ``decode_dtype`` when one is given; encoding stays as is."""
        self.vae.to(memory_format=torch.channels_last)
        if decode_dtype is not None:
            self.vae.decoder.to(decode_dtype)
            if self.vae.post_quant_conv is not None:
                self.vae.post_quant_conv.to(decode_dtype)

    @property
    def decode_dtype(self) -> torch.dtype:
        return next(self.vae.decoder.parameters()).dtype

    @property
    def scale_factor(self) -> int:
        return int(2 ** (len(self.vae.config.block_out_channels) - 1))

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation the UNet was trained on; per-channel statistics win when the folder has them."""
        cfg = self.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            m = torch.tensor(mean, dtype=latents.dtype, device=latents.device).view(1, -1, 1, 1)
            s = torch.tensor(std, dtype=latents.dtype, device=latents.device).view(1, -1, 1, 1)
            return latents * s / cfg.scaling_factor + m
        shift = getattr(cfg, "shift_factor", None) or 0.0
        return latents / cfg.scaling_factor + shift

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents → the space the denoiser was trained on (the inverse of ``unscale``)."""
        cfg = self.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            m = torch.tensor(mean, dtype=z.dtype, device=z.device).view(1, -1, 1, 1)
            s = torch.tensor(std, dtype=z.dtype, device=z.device).view(1, -1, 1, 1)
            return (z - m) * cfg.scaling_factor / s
        shift = getattr(cfg, "shift_factor", None) or 0.0
        return (z - shift) * cfg.scaling_factor

    def encode(self, pixels: np.ndarray, generator: torch.Generator) -> torch.Tensor:
        """One image (H, W, 3) uint8 → its latent (1, C, h, w) fp32 in the denoiser's space: a sample of the
        VAE's posterior drawn from ``generator``, as diffusers' img2img pipelines draw it (before the noise)."""
        return self.encode_normalized(normalized(pixels), generator)

    @torch.inference_mode()
    def encode_normalized(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Pixels (1, 3, H, W) in [-1, 1] → their latent, as ``encode``: the masked image an inpainting UNet
        reads has its repainted pixels at 0 (mid grey), which no uint8 value is."""
        dist = self.vae.encode(x.to(self.vae.device, self.vae.dtype)).latent_dist
        return self.scale(dist.sample(generator).to(torch.float32))

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Latents (B, C, h, w) → uint8 images (B, H, W, 3), rounded as diffusers' image processor does, and
        (B,) bool: the image's latent and decoded values were all finite (NaN would quantise to black)."""
        finite = torch.isfinite(latents).flatten(1).all(dim=1)
        z = self.unscale(latents).to(self.vae.device, self.decode_dtype).contiguous(memory_format=torch.channels_last)
        image = self.vae.decode(z, return_dict=False)[0].to(torch.float32)
        finite = finite.to(image.device) & torch.isfinite(image).flatten(1).all(dim=1)
        image = (torch.nan_to_num(image) / 2 + 0.5).clamp(0, 1)  # non-finite images are flagged, never shown
        return (image.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8), finite.cpu().numpy()
