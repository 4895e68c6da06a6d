"""Shared test helpers: reading labels back out of encoded images, waiting for readiness."""

from __future__ import annotations

import base64
import io
import json
import time
from typing import Any

from fastapi.testclient import TestClient
from PIL import Image

from app.gate.labels import DIGITAL_SOURCE_TYPE, PARAMETERS_KEY


def wait_ready(client: TestClient, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get("/readyz")
        if r.status_code == 200:
            return dict(r.json())
        time.sleep(0.1)
    raise AssertionError(f"not ready after {timeout}s: {client.get('/readyz').json()}")


def decode_image(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def xmp_of(image: Image.Image) -> str:
    raw = image.info.get("XML:com.adobe.xmp") or image.info.get("xmp") or b""
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def assert_labeled_synthetic(image: Image.Image, model: str) -> None:
    xmp = xmp_of(image)
    assert f"<Iptc4xmpExt:DigitalSourceType>{DIGITAL_SOURCE_TYPE}</Iptc4xmpExt:DigitalSourceType>" in xmp
    assert f"<Iptc4xmpExt:AISystemUsed>imagegen/{model}</Iptc4xmpExt:AISystemUsed>" in xmp


def png_parameters(image: Image.Image) -> dict[str, Any]:
    return dict(json.loads(image.info[PARAMETERS_KEY]))
