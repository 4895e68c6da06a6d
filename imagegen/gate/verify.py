"""Read back every label of an image: C2PA validation state, the XMP label and the watermark payload.

The bytes are untrusted (an upload): imagegen.uploads reads them, capped before anything is decoded or handed
to the C2PA reader.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from typing import Any

from imagegen.gate import watermark
from imagegen.gate.c2pa_manifest import read_manifest
from imagegen.gate.labels import MEDIA_TYPES
from imagegen.uploads import DEFAULT_MAX_PIXELS, NotAnImage, decode_rgb, open_image, sniff

_XMP_FIELD = re.compile(r"<Iptc4xmpExt:(DigitalSourceType|AISystemUsed|AISystemVersionUsed)>([^<]*)<")


def verify(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    """The labels of one PNG, JPEG or WebP image; raises an UploadError for anything else."""
    fmt = sniff(data)
    if fmt is None:
        raise NotAnImage("the body is not a PNG, JPEG or WebP image")
    image = open_image(data, fmt, max_pixels)
    pixels = decode_rgb(image)
    size, info = list(image.size), image.info
    image.close()  # its decoded copy is no longer needed while the watermark is read
    raw_xmp = info.get("XML:com.adobe.xmp") or info.get("xmp") or b""
    xmp = raw_xmp.decode(errors="replace") if isinstance(raw_xmp, bytes) else str(raw_xmp)
    reading = watermark.extract(pixels)
    del pixels
    return {
        "format": fmt,
        "size": size,
        "c2pa": asdict(read_manifest(data, MEDIA_TYPES[fmt])),
        "xmp": dict(_XMP_FIELD.findall(xmp)),
        "watermark": {
            "payload": None if reading.payload is None else f"{reading.payload:08x}",
            "confidence": round(reading.confidence, 3),
            "checked": watermark.can_mark(size[0], size[1]),
        },
    }
