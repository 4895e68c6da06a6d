"""C2PA manifests signed with c2pa-python and read back with its Reader."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagegen.gate.c2pa_manifest import ManifestSigner, SigningIdentity, read_manifest
from imagegen.gate.labels import DIGITAL_SOURCE_TYPE


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> ManifestSigner:
    return ManifestSigner(SigningIdentity.development_chain(tmp_path_factory.mktemp("keys")))


def encoded(fmt: str) -> bytes:
    rgb = (np.random.default_rng(0).uniform(0, 255, (128, 128, 3))).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize(("fmt", "media_type"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_signed_manifest_reads_back_valid_and_tampering_is_detected(
    signer: ManifestSigner, fmt: str, media_type: str
) -> None:
    signed = signer.sign(encoded(fmt), media_type, "image", "imagegen", "0.1.0")
    report = read_manifest(signed, media_type)
    assert report.state == "Valid" and report.claim_generator == "imagegen" and not report.thumbnail
    assert report.actions[0]["action"] == "c2pa.created"
    assert report.actions[0]["digitalSourceType"] == DIGITAL_SOURCE_TYPE
    assert Image.open(io.BytesIO(signed)).size == (128, 128)  # still a valid image
    tampered = bytearray(signed)
    tampered[len(tampered) // 2] ^= 0x01
    assert read_manifest(bytes(tampered), media_type).state == "Invalid"


def test_an_unsigned_image_has_no_manifest() -> None:
    assert read_manifest(encoded("PNG"), "image/png").state == "absent"


def test_the_development_chain_is_generated_once(tmp_path: Path) -> None:
    a = SigningIdentity.development_chain(tmp_path)
    b = SigningIdentity.development_chain(tmp_path)
    assert a.development and a.chain_pem == b.chain_pem and "development signer" in a.subject
    assert (tmp_path / "dev-key.pem").stat().st_mode & 0o077 == 0


def test_replicas_sharing_a_state_dir_make_one_development_chain(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        identities = list(pool.map(lambda _: SigningIdentity.development_chain(tmp_path / "c2pa"), range(4)))
    assert len({(i.chain_pem, i.key_pem) for i in identities}) == 1  # one chain, each read whole
