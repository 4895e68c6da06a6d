"""``release()`` is the only constructor of ``ReleasedImage``, the only thing a response may carry.

The type check is structural, not a convention: ``ReleasedImage.__post_init__`` refuses any caller
that does not hold this module's private token. Labels go on in a fixed order: invisible watermark
on the pixels → encoding with IPTC XMP (and PNG parameters) → C2PA manifest, signed last.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from imagegen import __version__
from imagegen.gate import watermark
from imagegen.gate.c2pa_manifest import ManifestSigner
from imagegen.gate.labels import MEDIA_TYPES, encode_labeled, xmp_packet

_TOKEN = object()
SYSTEM_NAME = "imagegen"


@dataclass(frozen=True)
class GenerationRecord:
    """How an image was made: enough to make it again."""

    model: str
    prompt: str
    negative_prompt: str
    sampler: str
    steps: int
    guidance_scale: float
    seed: int
    eta: float
    width: int
    height: int
    guidance_rescale: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ReleaseDecision:
    outcome: Literal["synthetic_labeled_preview"]
    labels: tuple[str, ...]
    reasons: tuple[str, ...] = ()
    watermark: str | None = None  # the 32-bit payload, hex; None where the image was too small


@dataclass(frozen=True)
class ReleasedImage:
    data: bytes
    format: str
    record: GenerationRecord
    decision: ReleaseDecision
    sha256: str
    _token: object = field(repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if self._token is not _TOKEN:
            raise TypeError("a ReleasedImage is made only by imagegen.gate.release()")

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.format]


@dataclass(frozen=True)
class HeldForReview:
    """What a response carries for an image the policy held: no pixels, a review id."""

    review_id: str
    record: GenerationRecord
    reasons: tuple[str, ...]


def release(
    pixels: np.ndarray,
    record: GenerationRecord,
    fmt: str,
    compression: int | None,
    signer: ManifestSigner | None = None,
) -> ReleasedImage:
    """Label, encode and sign generated pixels (H, W, 3) uint8 for release."""
    labels: list[str] = []
    payload = None
    if watermark.can_mark(pixels.shape[1], pixels.shape[0]):
        payload = secrets.randbits(watermark.PAYLOAD_BITS)
        pixels = watermark.embed(pixels, payload)
        labels.append("invisible_watermark")
    else:
        labels.append(f"invisible_watermark_skipped_below_{watermark.MIN_SIDE}px")
    data = encode_labeled(
        pixels, fmt, compression, xmp_packet(f"{SYSTEM_NAME}/{record.model}", __version__), record.as_dict()
    )
    labels += ["iptc_xmp", "png_parameters"] if fmt == "png" else ["iptc_xmp"]
    if signer is not None:
        data = signer.sign(data, MEDIA_TYPES[fmt], f"{record.model}-{record.seed}.{fmt}", SYSTEM_NAME, __version__)
        labels.append("c2pa_manifest" if not signer.identity.development else "c2pa_manifest_untrusted_signer")
    decision = ReleaseDecision(
        outcome="synthetic_labeled_preview",
        labels=tuple(labels),
        watermark=None if payload is None else f"{payload:08x}",
    )
    return ReleasedImage(
        data=data, format=fmt, record=record, decision=decision, sha256=hashlib.sha256(data).hexdigest(), _token=_TOKEN
    )
