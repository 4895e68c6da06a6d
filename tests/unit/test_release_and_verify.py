"""gate.release() applies every label in order; verify() and `python -m imagegen verify` read them back."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from imagegen.gate import GenerationRecord, release
from imagegen.gate.c2pa_manifest import ManifestSigner, SigningIdentity
from imagegen.gate.labels import DIGITAL_SOURCE_TYPE
from imagegen.gate.verify import verify
from imagegen.uploads import ImageTooLarge, InvalidImage, NotAnImage
from models.recipes.data import sample

RECORD = GenerationRecord("catalog-128", "a red mug", "", "ddim", 25, 3.0, 7, 0.0, 128, 128)


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> ManifestSigner:
    return ManifestSigner(SigningIdentity.development_chain(tmp_path_factory.mktemp("keys")))


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_released_images_carry_every_label(signer: ManifestSigner, fmt: str) -> None:
    image = release(sample("val", 5, 1).image, RECORD, fmt, None, signer)
    assert image.decision.labels[0] == "invisible_watermark" and image.decision.labels[-1].startswith("c2pa_manifest")
    report = verify(image.data)
    assert report["c2pa"]["state"] == "Valid"
    assert report["c2pa"]["actions"][0] == {"action": "c2pa.created", "digitalSourceType": DIGITAL_SOURCE_TYPE}
    assert report["xmp"]["DigitalSourceType"] == DIGITAL_SOURCE_TYPE
    assert report["xmp"]["AISystemUsed"] == "imagegen/catalog-128"
    assert report["watermark"]["payload"] == image.decision.watermark


def test_the_watermark_outlives_the_manifest(signer: ManifestSigner) -> None:
    image = release(sample("val", 5, 2).image, RECORD, "png", None, signer)
    buf = io.BytesIO()
    Image.open(io.BytesIO(image.data)).convert("RGB").save(buf, "JPEG", quality=90)  # a re-upload strips metadata
    report = verify(buf.getvalue())
    assert report["c2pa"]["state"] == "absent" and report["xmp"] == {}
    assert report["watermark"]["payload"] == image.decision.watermark


def test_verify_refuses_what_is_not_an_image() -> None:
    with pytest.raises(NotAnImage):
        verify(b"not an image")
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, "GIF")  # Pillow reads it; verify() takes PNG, JPEG and WebP only
    with pytest.raises(NotAnImage):
        verify(gif.getvalue())


def test_verify_caps_pixels_and_refuses_broken_images() -> None:
    png = io.BytesIO()
    Image.new("RGB", (64, 64)).save(png, "PNG")
    assert verify(png.getvalue(), max_pixels=64 * 64)["size"] == [64, 64]
    with pytest.raises(ImageTooLarge):
        verify(png.getvalue(), max_pixels=64 * 64 - 1)
    with pytest.raises(InvalidImage):
        verify(png.getvalue()[:60])


def test_cli_verify(signer: ManifestSigner, tmp_path: Path) -> None:
    path = tmp_path / "out.png"
    path.write_bytes(release(sample("val", 5, 3).image, RECORD, "png", None, signer).data)
    out = subprocess.run(
        [sys.executable, "-m", "imagegen", "verify", str(path)], capture_output=True, text=True, check=True
    )
    report = json.loads(out.stdout)
    assert report["file"] == str(path) and report["c2pa"]["state"] == "Valid" and report["watermark"]["payload"]
