"""An edit's input image and mask brought onto the output canvas, and the canvas size when none is asked for.

``resize_mode`` says how an input of another size than the output is fitted:

- ``crop`` (the default): scaled to cover the canvas, keeping its aspect, and centred; what overhangs is cut.
- ``stretch``: scaled to the canvas exactly (its aspect may change).
- ``pad`` (outpainting): scaled to fit inside the canvas, keeping its aspect, and placed at ``image_x``/``image_y``
  (pixels from the canvas's top-left; centred when not given). The new canvas around it is generated: it is added
  to the mask, and its starting pixels repeat the image's edges (what an img2img strength below 1 starts from).

Images are resampled with Lanczos, masks bilinearly (a soft edge stays soft). Without ``size`` the canvas keeps
the input's aspect at the model's native area, in multiples of the model's size step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from imagegen.api.errors import APIError

ResizeMode = Literal["crop", "stretch", "pad"]


@dataclass(frozen=True)
class Canvas:
    image: np.ndarray  # (H, W, 3) uint8: the input on the output canvas
    repaint: np.ndarray | None  # (H, W) float32, 1 generated, 0 kept; None: no mask (img2img)


def default_size(width: int, height: int, native_area: int, multiple: int) -> tuple[int, int]:
    """The input's aspect at the model's native area, each side a positive multiple of ``multiple``."""
    scale = math.sqrt(native_area / (width * height))
    w = max(multiple, round(width * scale / multiple) * multiple)
    h = max(multiple, round(height * scale / multiple) * multiple)
    return w, h


def _resize(array: np.ndarray, width: int, height: int, resample: Image.Resampling) -> np.ndarray:
    if array.shape[1] == width and array.shape[0] == height:
        return array
    return np.asarray(Image.fromarray(array).resize((width, height), resample))  # uint8 RGB or float32 "F"


def _fit(array: np.ndarray, width: int, height: int, mode: ResizeMode, resample: Image.Resampling) -> np.ndarray:
    h, w = array.shape[:2]
    if mode == "stretch":
        return _resize(array, width, height, resample)
    scale = max(width / w, height / h) if mode == "crop" else min(width / w, height / h)
    sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
    scaled = _resize(array, sw, sh, resample)
    if mode == "pad":
        return scaled
    left, top = (sw - width) // 2, (sh - height) // 2
    return scaled[top : top + height, left : left + width]


def place(
    rgb: np.ndarray,
    repaint: np.ndarray | None,
    width: int,
    height: int,
    mode: ResizeMode,
    at: tuple[int | None, int | None] = (None, None),
) -> Canvas:
    """The input (and its mask: 1 repaint, 0 keep) on a ``width`` × ``height`` canvas."""
    image = _fit(rgb, width, height, mode, Image.Resampling.LANCZOS)
    mask = None
    if repaint is not None:
        mask = np.clip(_fit(repaint.astype(np.float32), width, height, mode, Image.Resampling.BILINEAR), 0, 1)
    if mode != "pad":
        return Canvas(np.array(image, order="C"), None if mask is None else mask.astype(np.float32))
    h, w = image.shape[:2]
    x = (width - w) // 2 if at[0] is None else at[0]
    y = (height - h) // 2 if at[1] is None else at[1]
    if not (0 <= x <= width - w and 0 <= y <= height - h):
        raise APIError(
            400,
            "invalid_placement",
            f"the image, fitted to {w}x{h}, must lie inside the {width}x{height} canvas: image_x ≤ {width - w}, "
            f"image_y ≤ {height - h}",
            "image_x" if not 0 <= x <= width - w else "image_y",
        )
    pad = ((y, height - h - y), (x, width - w - x))
    canvas = np.pad(image, (*pad, (0, 0)), mode="edge")
    new_area = np.pad(np.zeros((h, w), np.float32) if mask is None else mask.astype(np.float32), pad, constant_values=1)
    return Canvas(np.array(canvas, order="C"), new_area)
