"""Turn a UNet output into (x0, ε) given its prediction type, in variance-preserving space.

x_t = sqrt(ᾱ)·x0 + sqrt(1-ᾱ)·ε; v = sqrt(ᾱ)·ε - sqrt(1-ᾱ)·x0 (Salimans & Ho 2022).
"""

from __future__ import annotations

import torch


def to_x0_eps_vp(
    prediction_type: str,
    x: torch.Tensor,
    out: torch.Tensor,
    sqrt_a: torch.Tensor,
    sqrt_b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    if prediction_type == "epsilon":
        return (x - sqrt_b * out) / sqrt_a, out
    if prediction_type == "v_prediction":
        return sqrt_a * x - sqrt_b * out, sqrt_a * out + sqrt_b * x
    x0 = out  # "sample"
    return x0, (x - sqrt_a * x0) / sqrt_b


def to_x0_karras(prediction_type: str, x: torch.Tensor, out: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0 from a model output when x lives in σ-space (x = x0 + σ·ε), as the Euler samplers keep it."""
    if prediction_type == "epsilon":
        return x - sigma * out
    if prediction_type == "v_prediction":
        return out * (-sigma / (sigma**2 + 1) ** 0.5) + (x / (sigma**2 + 1))
    return out
