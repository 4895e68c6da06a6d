"""``release()`` is the only constructor of ``ReleasedImage``, the only thing a response may carry.

The type check is structural, not a convention: ``ReleasedImage.__post_init__`` refuses any caller
that does not hold this module's private token. Labels go on in a fixed order: invisible watermark
on the pixels → encoding with IPTC XMP (and PNG parameters) → C2PA manifest, signed last. An edit is labelled a
composite: its input is the manifest's ``parentOf`` ingredient and both labels name
``compositeWithTrainedAlgorithmicMedia``.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from imagegen import __version__
from imagegen.gate import watermark
from imagegen.gate.c2pa_manifest import Ingredient, ManifestSigner
from imagegen.gate.composite import KeptRegion
from imagegen.gate.labels import COMPOSITE_SOURCE_TYPE, DIGITAL_SOURCE_TYPE, MEDIA_TYPES, encode_labeled, xmp_packet

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
    strength: float | None = None  # edits: how much of the plan re-drew the input
    input_sha256: str | None = None  # edits: of the input file as uploaded

    def as_dict(self) -> dict[str, Any]:
        """Every field; a generation's record leaves out the edit fields (its PNG parameters, the review store)."""
        out = asdict(self)
        for edit_field in ("strength", "input_sha256"):
            if out[edit_field] is None:
                del out[edit_field]
        return out


@dataclass(frozen=True)
class ReleaseDecision:
    outcome: Literal["synthetic_labeled_preview"]
    labels: tuple[str, ...]
    reasons: tuple[str, ...] = ()
    watermark: str | None = None  # the 32-bit payload, hex; None where the image was too small
    kept: KeptRegion | None = None  # an edit's pixels that are the input's own


@dataclass(frozen=True)
class EditInput:
    """An edit's input file as the user sent it (the C2PA ingredient) and what the composite kept of it."""

    data: bytes = field(repr=False)
    media_type: str
    kept: KeptRegion | None  # None: nothing was composited back (img2img, or preserve_unmasked off)


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
    edit: EditInput | None = None,
    partial: int | None = None,
) -> ReleasedImage:
    """Label, encode and sign generated pixels (H, W, 3) uint8 for release (an edit's already composited)."""
    labels: list[str] = []
    payload = None
    if watermark.can_mark(pixels.shape[1], pixels.shape[0]):
        payload = secrets.randbits(watermark.PAYLOAD_BITS)
        pixels = watermark.embed(pixels, payload)
        labels.append("invisible_watermark")
    else:
        labels.append(f"invisible_watermark_skipped_below_{watermark.MIN_SIDE}px")
    source_type = DIGITAL_SOURCE_TYPE if edit is None else COMPOSITE_SOURCE_TYPE
    xmp = xmp_packet(f"{SYSTEM_NAME}/{record.model}", __version__, source_type)
    data = encode_labeled(pixels, fmt, compression, xmp, record.as_dict())
    labels += ["iptc_xmp", "png_parameters"] if fmt == "png" else ["iptc_xmp"]
    if edit is not None:
        labels.append("composite_with_input" if edit.kept is not None else "edited_input")
    if partial is not None:
        labels.append("partial_image")  # a preview of the image while it forms: labelled and signed the same
    if signer is not None:
        title = f"{record.model}-{record.seed}{'' if partial is None else f'-partial{partial}'}.{fmt}"
        ingredient = None if edit is None else Ingredient(edit.data, edit.media_type, edit.kept is not None)
        data = signer.sign(data, MEDIA_TYPES[fmt], title, SYSTEM_NAME, __version__, ingredient)
        labels.append("c2pa_manifest" if not signer.identity.development else "c2pa_manifest_untrusted_signer")
    decision = ReleaseDecision(
        outcome="synthetic_labeled_preview",
        labels=tuple(labels),
        watermark=None if payload is None else f"{payload:08x}",
        kept=None if edit is None else edit.kept,
    )
    return ReleasedImage(
        data=data, format=fmt, record=record, decision=decision, sha256=hashlib.sha256(data).hexdigest(), _token=_TOKEN
    )
