"""Edits keep the user's product: the input's pixels outside the mask are put back into the decoded output, at the
output's full resolution and before any label goes on, so that what the mask keeps is exactly the user's pixels
(up to the invisible watermark, which spans the whole image).

The VAE cannot reproduce a photo exactly, and an inpainting row only holds the kept region in latent space (8×
coarser): without this step a product's edges, text and colours drift by a few levels everywhere.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class KeptRegion:
    """Which pixels of an edit are the input's own: the response's ``release.kept`` and the review record."""

    pixels: int  # input pixels kept exactly (mask 0)
    blended: int  # pixels of a soft mask edge (0 < mask < 1): a blend of the input and the generated image
    fraction: float  # kept pixels / all pixels
    box: tuple[int, int, int, int] | None  # x0, y0, x1, y1 (exclusive) around the kept pixels; None if none
    mask_sha256: str  # of the mask as applied: (H, W) uint8, 255 = generated, 0 = kept, row-major bytes

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def mask_bytes(repaint: np.ndarray) -> bytes:
    return np.round(np.clip(repaint, 0.0, 1.0) * 255).astype(np.uint8).tobytes()


def composite(generated: np.ndarray, original: np.ndarray, repaint: np.ndarray) -> tuple[np.ndarray, KeptRegion]:
    """(H, W, 3) uint8 generated and original, (H, W) float repaint (1 generated, 0 kept) → the composite and what
    it kept. Where ``repaint`` is 0 the result is ``original`` bit for bit."""
    if generated.shape != original.shape or repaint.shape != generated.shape[:2]:
        raise ValueError(f"shapes differ: {generated.shape}, {original.shape}, {repaint.shape}")
    m = np.clip(repaint.astype(np.float32), 0.0, 1.0)[..., None]
    blended = original.astype(np.float32) * (1 - m) + generated.astype(np.float32) * m
    out = np.where(m == 0, original, np.clip(np.round(blended), 0, 255).astype(np.uint8))
    kept = m[..., 0] == 0
    count = int(kept.sum())
    box = None
    if count:
        ys, xs = np.nonzero(kept.any(axis=1))[0], np.nonzero(kept.any(axis=0))[0]
        box = (int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1)
    region = KeptRegion(
        pixels=count,
        blended=int(((m > 0) & (m < 1)).sum()),
        fraction=round(count / kept.size, 6),
        box=box,
        mask_sha256=hashlib.sha256(mask_bytes(repaint)).hexdigest(),
    )
    return out, region
