"""The invisible watermark: survives PNG and JPEG 90, stays invisible, refuses images under 128 px."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from imagegen.gate.watermark import can_mark, embed, extract
from models.recipes.data import sample

IMAGES = [sample("val", 11, i).image for i in range(8)]


def reencode(rgb: np.ndarray, fmt: str, **kw: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, **kw)
    return np.asarray(Image.open(buf).convert("RGB"))


@pytest.mark.parametrize("index", range(len(IMAGES)))
def test_payload_survives_png_and_jpeg_90(index: int) -> None:
    payload = 0x5EED0000 + index
    marked = embed(IMAGES[index], payload)
    psnr = 10 * np.log10(255**2 / ((marked.astype(float) - IMAGES[index]) ** 2).mean())
    assert psnr > 40  # invisible to the eye
    assert extract(reencode(marked, "PNG")).payload == payload
    assert extract(reencode(marked, "JPEG", quality=90)).payload == payload


def test_unmarked_images_read_as_unmarked() -> None:
    assert all(extract(img).payload is None for img in IMAGES)


def test_small_images_and_large_payloads_are_refused() -> None:
    assert not can_mark(64, 64) and can_mark(128, 256)
    with pytest.raises(ValueError, match="128"):
        embed(np.zeros((64, 64, 3), np.uint8), 1)
    with pytest.raises(ValueError, match="32 bits"):
        embed(IMAGES[0], 2**32)
    assert extract(np.zeros((64, 64, 3), np.uint8)).payload is None
