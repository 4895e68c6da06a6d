"""Read back every label of an image: C2PA validation state, the XMP label and the watermark payload."""

from __future__ import annotations

import io
import re
from dataclasses import asdict
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from app.gate import watermark
from app.gate.c2pa_manifest import read_manifest
from app.gate.labels import MEDIA_TYPES

_XMP_FIELD = re.compile(r"<Iptc4xmpExt:(DigitalSourceType|AISystemUsed|AISystemVersionUsed)>([^<]*)<")


class NotAnImage(ValueError):
    pass


def verify(data: bytes) -> dict[str, Any]:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise NotAnImage("the body is not an image Pillow can read") from exc
    fmt = (image.format or "").lower()
    media_type = MEDIA_TYPES.get(fmt)
    raw_xmp = image.info.get("XML:com.adobe.xmp") or image.info.get("xmp") or b""
    xmp = raw_xmp.decode(errors="replace") if isinstance(raw_xmp, bytes) else str(raw_xmp)
    reading = watermark.extract(np.asarray(image.convert("RGB")))
    c2pa = asdict(read_manifest(data, media_type)) if media_type else {"state": "unsupported_format"}
    return {
        "format": fmt,
        "size": list(image.size),
        "c2pa": c2pa,
        "xmp": dict(_XMP_FIELD.findall(xmp)),
        "watermark": {
            "payload": None if reading.payload is None else f"{reading.payload:08x}",
            "confidence": round(reading.confidence, 3),
            "checked": watermark.can_mark(*image.size),
        },
    }
