"""The invisible watermark: the same bits as block by block, survives PNG, JPEG 90 and WebP 90, stays invisible,
refuses images under 128 px."""

from __future__ import annotations

import functools
import io

import numpy as np
import pytest
from PIL import Image

from imagegen.gate import watermark
from imagegen.gate.watermark import BITS, BLOCK, CHECK_BITS, MIN_SIDE, STEP, can_mark, crc8, embed, extract
from models.recipes.data import sample

IMAGES = [sample("val", 11, i).image for i in range(8)]


# ---- the reference: the watermark as first written, one 4×4 block at a time (app/gate/watermark.py, 272b1ed), with
# extract's float32 luma (dcd6838). The package's batched code must give the same pixels and readings, bit for bit.
def _ref_dct(n: int) -> np.ndarray:
    k = np.arange(n)
    m = np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return m


REF_DCT = _ref_dct(BLOCK)


def _ref_haar(plane: np.ndarray) -> tuple[np.ndarray, ...]:
    a, b = plane[0::2, 0::2], plane[0::2, 1::2]
    c, d = plane[1::2, 0::2], plane[1::2, 1::2]
    return (a + b + c + d) / 2, (a - b + c - d) / 2, (a + b - c - d) / 2, (a - b - c + d) / 2


def _ref_blocks(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    return [(i, j) for i in range(0, shape[0] - BLOCK + 1, BLOCK) for j in range(0, shape[1] - BLOCK + 1, BLOCK)]


def reference_embed(rgb: np.ndarray, payload: int) -> np.ndarray:
    word = (payload << CHECK_BITS) | crc8(payload)
    bits = [(word >> (BITS - 1 - i)) & 1 for i in range(BITS)]
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    yuv = np.stack([y, (b - y) * 0.564 + 128, (r - y) * 0.713 + 128], axis=-1)
    plane = yuv[..., 0]
    h, w = plane.shape[0] // 2 * 2, plane.shape[1] // 2 * 2
    ll, lh, hl, hh = _ref_haar(plane[:h, :w])
    for k, (i, j) in enumerate(_ref_blocks(ll.shape)):
        coeffs = REF_DCT @ ll[i : i + BLOCK, j : j + BLOCK] @ REF_DCT.T
        u, s, vt = np.linalg.svd(coeffs)
        s[0] = (np.floor(s[0] / STEP) + (0.75 if bits[k % BITS] else 0.25)) * STEP
        ll[i : i + BLOCK, j : j + BLOCK] = REF_DCT.T @ (u @ np.diag(s) @ vt) @ REF_DCT
    marked = plane.copy()
    marked[0:h:2, 0:w:2] = (ll + lh + hl + hh) / 2
    marked[0:h:2, 1:w:2] = (ll - lh + hl - hh) / 2
    marked[1:h:2, 0:w:2] = (ll + lh - hl - hh) / 2
    marked[1:h:2, 1:w:2] = (ll - lh - hl + hh) / 2
    y, u_, v_ = marked, yuv[..., 1] - 128, yuv[..., 2] - 128
    out = np.stack([y + 1.403 * v_, y - 0.344 * u_ - 0.714 * v_, y + 1.773 * u_], axis=-1)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def reference_extract(rgb: np.ndarray) -> tuple[int | None, float]:
    luma = np.multiply(rgb[..., 0], np.float32(0.299), dtype=np.float32)
    for channel, weight in ((1, 0.587), (2, 0.114)):
        luma += np.multiply(rgb[..., channel], np.float32(weight), dtype=np.float32)
    h, w = luma.shape[0] // 2 * 2, luma.shape[1] // 2 * 2
    ll = _ref_haar(luma[:h, :w])[0]
    blocks = _ref_blocks(ll.shape)
    votes = np.zeros(BITS)
    for k, (i, j) in enumerate(blocks):
        s0 = np.linalg.svd(REF_DCT @ ll[i : i + BLOCK, j : j + BLOCK] @ REF_DCT.T, compute_uv=False)[0]
        votes[k % BITS] += 1 if (s0 / STEP) % 1.0 >= 0.5 else -1
    word = 0
    for v in votes:
        word = (word << 1) | int(v > 0)
    payload, check = word >> CHECK_BITS, word & 0xFF
    return (payload if crc8(payload) == check else None), float(np.abs(votes).mean() / (len(blocks) / BITS))


# ---- images: random noise, catalog images (scaled to other sizes), odd sides, and flat greys whose largest
# singular value sits exactly on a quantisation boundary (8·y = 32·n): any change of arithmetic shows there.
def _resized(image: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


def _flat_greys() -> np.ndarray:
    image = np.full((136, 200, 3), 128, np.uint8)
    for n, level in enumerate(range(0, 256, 16)):
        image[:, n * 12 : n * 12 + 12] = level  # bands 12 px wide: 6 low-band columns, blocks flat and not
    image[100:, :] = (4, 8, 12)
    return image


_rng = np.random.default_rng(20261201)
CASES = {
    "noise-128": _rng.integers(0, 256, (128, 128, 3), dtype=np.uint8),
    "noise-200x136": _rng.integers(0, 256, (136, 200, 3), dtype=np.uint8),
    "noise-136x200": _rng.integers(0, 256, (200, 136, 3), dtype=np.uint8),
    "noise-131x129-odd": _rng.integers(0, 256, (129, 131, 3), dtype=np.uint8),
    "noise-512": _rng.integers(0, 256, (512, 512, 3), dtype=np.uint8),
    "catalog-128-a": IMAGES[0],
    "catalog-128-b": IMAGES[5],
    "catalog-200x136": _resized(IMAGES[1], 200, 136),
    "catalog-137x250-odd": _resized(IMAGES[2], 137, 250),
    "catalog-512": _resized(IMAGES[3], 512, 512),
    "flat-greys-200x136": _flat_greys(),
    "black-128": np.zeros((128, 128, 3), np.uint8),
    "white-128": np.full((128, 128, 3), 255, np.uint8),
}
PAYLOADS = {name: (0x9E3779B9 * (n + 1)) % 2**32 for n, name in enumerate(CASES)}


@functools.cache
def reference(name: str) -> tuple[np.ndarray, tuple[int | None, float], tuple[int | None, float]]:
    """The reference's marked image, its reading of it, and its reading of the unmarked image."""
    marked = reference_embed(CASES[name], PAYLOADS[name])
    return marked, reference_extract(marked), reference_extract(CASES[name])


@pytest.mark.parametrize("pass_pixels", [watermark.PASS_PIXELS, 1], ids=["default-bands", "8-row-bands"])
@pytest.mark.parametrize("name", list(CASES))
def test_the_same_bits_as_block_by_block(name: str, pass_pixels: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watermark, "PASS_PIXELS", pass_pixels)  # many bands or few: the same pixels
    marked, reading_marked, reading_unmarked = reference(name)
    ours = embed(CASES[name], PAYLOADS[name])
    assert ours.dtype == np.uint8 and ours.shape == CASES[name].shape
    assert np.array_equal(ours, marked)  # bit for bit, not within a tolerance
    for image, expected in ((marked, reading_marked), (CASES[name], reading_unmarked)):
        reading = extract(image)
        assert (reading.payload, reading.confidence) == expected
    assert reading_marked[0] == PAYLOADS[name]


def test_the_ragged_edge_beyond_whole_blocks_barely_moves() -> None:
    """The ragged edge (rows and columns beyond whole blocks) is only round-tripped through YUV: ≤ 1 level."""
    image = CASES["catalog-137x250-odd"]
    marked = embed(image, 1).astype(int)
    edge_rows, edge_cols = (image.shape[0] // 2 // BLOCK) * 2 * BLOCK, (image.shape[1] // 2 // BLOCK) * 2 * BLOCK
    assert np.abs(marked[edge_rows:] - image[edge_rows:]).max() <= 1
    assert np.abs(marked[:, edge_cols:] - image[:, edge_cols:]).max() <= 1


def reencode(rgb: np.ndarray, fmt: str, **kw: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, **kw)
    return np.asarray(Image.open(buf).convert("RGB"))


@pytest.mark.parametrize("index", range(len(IMAGES)))
def test_payload_survives_png_jpeg_90_and_webp_90(index: int) -> None:
    payload = 0x5EED0000 + index
    marked = embed(IMAGES[index], payload)
    psnr = 10 * np.log10(255**2 / ((marked.astype(float) - IMAGES[index]) ** 2).mean())
    assert psnr > 40  # invisible to the eye (the docstring's 44.1 dB is the mean over catalog images)
    assert extract(marked).payload == payload
    assert extract(reencode(marked, "PNG")).payload == payload
    assert extract(reencode(marked, "JPEG", quality=90)).payload == payload  # PIL's default 4:2:0 chroma
    assert extract(reencode(marked, "WEBP", quality=90)).payload == payload


def test_payload_survives_lossy_encoding_at_other_sizes() -> None:
    for name in ("catalog-200x136", "catalog-512"):
        marked = reference(name)[0]
        for fmt in ("JPEG", "WEBP"):
            assert extract(reencode(marked, fmt, quality=90)).payload == PAYLOADS[name], (name, fmt)


def test_mean_psnr_is_the_documented_44_db() -> None:
    psnrs = [10 * np.log10(255**2 / ((embed(im, 7).astype(float) - im) ** 2).mean()) for im in IMAGES]
    assert 43 < np.mean(psnrs) < 46


def test_unmarked_images_read_as_unmarked() -> None:
    assert all(extract(img).payload is None for img in IMAGES)


def test_can_mark_edges() -> None:
    assert MIN_SIDE == 128
    assert can_mark(128, 128) and can_mark(128, 4096) and can_mark(4096, 128)
    assert not can_mark(127, 128) and not can_mark(128, 127) and not can_mark(127, 4096) and not can_mark(0, 0)
    assert not can_mark(64, 64) and can_mark(128, 256)


def test_small_images_and_out_of_range_payloads_are_refused() -> None:
    for shape in ((64, 64, 3), (127, 500, 3), (500, 127, 3)):
        with pytest.raises(ValueError, match="128"):
            embed(np.zeros(shape, np.uint8), 1)
        assert extract(np.zeros(shape, np.uint8)) == watermark.Reading(None, 0.0)
    for payload in (-1, 2**32):
        with pytest.raises(ValueError, match="32 bits"):
            embed(IMAGES[0], payload)
    for payload in (0, 2**32 - 1):  # the ends of the range are carried
        assert extract(embed(IMAGES[0], payload)).payload == payload
    assert extract(embed(np.zeros((128, 128, 3), np.uint8), 5)).payload == 5  # the smallest markable image
