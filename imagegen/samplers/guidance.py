"""Classifier-free guidance per row (Ho & Salimans 2022): ε = ε_u + w·(ε_c − ε_u).

The forward pass runs cond rows first, then uncond rows for just the rows that need them
(w > 1 on a UNet without a guidance embedding); ``uncond_of[i]`` is row i's uncond row or -1.
"""

from __future__ import annotations

import math

import torch


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """LCM's guidance-scale embedding of w − 1 (Luo et al. 2023; diffusers' get_guidance_scale_embedding)."""
    w = (w - 1.0) * 1000.0
    half = dim // 2
    scale = math.log(10000.0) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -scale)
    emb = w.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb  # (B, dim)


def apply_cfg(
    out: torch.Tensor,
    n_rows: int,
    uncond_index: torch.Tensor,
    scale: torch.Tensor,
    rescale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Combine a forward pass over [cond rows; uncond rows] into one prediction per row.

    out: (n_rows + U, C, H, W); uncond_index: (n_rows,) long, the row's uncond output or -1;
    scale: (n_rows,) guidance w. Rows without an uncond output keep their cond prediction as is.
    rescale: (n_rows,) φ of "Common Diffusion Noise Schedules and Sample Steps are Flawed" (Lin et al.
    2023, §3.4): the guided prediction's per-row std is pulled back towards the cond prediction's by φ,
    which keeps high guidance from over-exposing (as diffusers' ``rescale_noise_cfg``).
    """
    cond = out[:n_rows]
    if out.shape[0] == n_rows:
        return cond
    has = uncond_index >= 0
    uncond = out[uncond_index.clamp(min=0)]
    guided = uncond + scale.view(-1, 1, 1, 1).to(out.dtype) * (cond - uncond)
    if rescale is not None:
        dims = tuple(range(1, out.ndim))
        matched = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
        phi = rescale.view(-1, 1, 1, 1).to(out.dtype)
        guided = phi * matched + (1 - phi) * guided
    return torch.where(has.view(-1, 1, 1, 1), guided, cond)
