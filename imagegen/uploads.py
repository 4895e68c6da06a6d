"""Untrusted image uploads, read safely: the format from the magic bytes (PNG, JPEG and WebP only), the pixel
count from the header and capped before anything is decoded, corrupt data a clear error rather than a crash.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile

DEFAULT_MAX_PIXELS = 4096 * 4096  # the service passes settings.max_upload_pixels
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
# What Pillow raises on bytes it cannot parse, besides OSError (UnidentifiedImageError, truncation).
_BROKEN = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)


class UploadError(ValueError):
    """An upload refused; each subclass is one answer of the HTTP routes."""


class NotAnImage(UploadError):
    """Not PNG, JPEG or WebP, by the magic bytes."""


class InvalidImage(UploadError):
    """A supported format, but truncated or corrupt."""


class ImageTooLarge(UploadError):
    """More pixels than the cap, by the header."""


def sniff(data: bytes) -> str | None:
    """The format named by the magic bytes: png, jpeg, webp, or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _png_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 24 or data[12:16] != b"IHDR":  # the first chunk, by the spec
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height


# Start-of-frame markers (baseline, progressive, lossless, arithmetic…); C4, C8 and CC are not frames.
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_MAX_STEPS = 1024  # real files have a few dozen segments before the frame; fill bytes could be millions


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """The frame size from the first SOF segment, walking the segments before it by their lengths.

    None where the walk fails (junk between segments, which Pillow skips): Pillow's lazy open reads it.
    """
    i = 2
    for _ in range(_JPEG_MAX_STEPS):
        if i + 9 > len(data) or data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in _JPEG_FRAMES:
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        elif marker == 0x01 or 0xD0 <= marker <= 0xD9:  # markers without a length
            i += 2
        else:
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """The canvas size from the first chunk's header."""
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    return None


_HEADER_SIZE = {"png": _png_size, "jpeg": _jpeg_size, "webp": _webp_size}


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageTooLarge(f"the image is {width}×{height}; at most {max_pixels} pixels are accepted")


def open_image(data: bytes, fmt: str, max_pixels: int) -> ImageFile.ImageFile:
    """Apply the pixel cap to the header's size, then let Pillow parse the header (lazily: no pixel data)."""
    size = _HEADER_SIZE[fmt](data)
    if size is not None:
        _check_pixels(size, max_pixels)  # before Pillow's own, louder bomb check
    elif fmt == "webp":  # Pillow's WebP decoder allocates the canvas as it opens: know its size first
        raise InvalidImage("the WebP header names no canvas size")
    try:
        image = Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[fmt]])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own limit (MAX_IMAGE_PIXELS) stays an outer bound; its warning is an error under -W error
        raise ImageTooLarge(f"at most {max_pixels} pixels are accepted") from exc
    except _BROKEN as exc:
        raise InvalidImage(f"the body is not a readable {_PIL_FORMATS[fmt]} image") from exc
    _check_pixels(image.size, max_pixels)
    return image


def decode_rgb(image: ImageFile.ImageFile) -> np.ndarray:
    """(H, W, 3) uint8, with one copy of the pixels at a time: a large upload costs a few times its RGB size."""
    try:
        image.load()
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        pixels = np.empty((rgb.height, rgb.width, 3), dtype=np.uint8)
        pixels.reshape(-1)[:] = np.frombuffer(rgb.tobytes(), dtype=np.uint8)
        return pixels
    except _BROKEN as exc:
        raise InvalidImage("the image data is truncated or corrupt") from exc


@dataclass(frozen=True)
class Upload:
    """An uploaded image as received (its bytes, for provenance) and decoded."""

    data: bytes
    format: str  # png | jpeg | webp
    rgb: np.ndarray  # (H, W, 3) uint8
    alpha: np.ndarray | None  # (H, W) uint8 where the file has an alpha channel (or a transparent palette entry)

    @property
    def media_type(self) -> str:
        return f"image/{self.format}"


def read_upload(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Upload:
    """Decode an untrusted PNG, JPEG or WebP upload; raises an UploadError for anything else."""
    fmt = sniff(data)
    if fmt is None:
        raise NotAnImage("not a PNG, JPEG or WebP image")
    image = open_image(data, fmt, max_pixels)
    try:
        has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info
        if not has_alpha:
            return Upload(data, fmt, decode_rgb(image), None)
        try:
            rgba = np.asarray(image.convert("RGBA"))
        except _BROKEN as exc:
            raise InvalidImage("the image data is truncated or corrupt") from exc
        return Upload(data, fmt, np.ascontiguousarray(rgba[..., :3]), np.ascontiguousarray(rgba[..., 3]))
    finally:
        image.close()
