"""Request and response bodies. Types are checked here; bounds that come from settings in validation.py."""

from __future__ import annotations

import base64
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from imagegen.gate import GenerationRecord, ReleasedImage
from imagegen.gate.release import HeldForReview

# Lone surrogates, C0/C1 controls but tab and newlines, and Unicode non-characters: no valid text holds them,
# and a surrogate cannot even be encoded as UTF-8 (for the tokenizer, the database, a JSON response).
_INVALID_TEXT = re.compile(
    "[\ud800-\udfff\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufdd0-\ufdef"
    + "".join(f"{chr(plane * 0x10000 + 0xFFFE)}{chr(plane * 0x10000 + 0xFFFF)}" for plane in range(17))
    + "]"
)


def valid_text(value: str) -> str:
    if (bad := _INVALID_TEXT.search(value)) is not None:
        raise ValueError(f"contains U+{ord(bad.group()):04X}, which is not valid text")
    return value


Text = Annotated[str, AfterValidator(valid_text)]


class ImageGenerationBody(BaseModel):
    """OpenAI's Images API generate body, plus the diffusion fields."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: Text
    model: Text | None = Field(None, max_length=256)
    n: int = Field(1, strict=True)  # strict: "1", true and 2.0 are not counts
    size: Text | None = Field(None, description='"WxH" (or "auto" for the model default)')
    response_format: Text | None = Field(None, description="b64_json (default) or url")
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int | None = Field(None, ge=0, le=100, strict=True, description="JPEG/WebP quality")
    user: Text | None = Field(None, max_length=256)
    quality: Text | None = Field(
        None, max_length=32, description="low | medium | high | auto: the model's step presets"
    )
    background: Text | None = Field(None, max_length=32, description="opaque | auto (transparent is refused)")
    stream: bool = Field(False, strict=True)
    partial_images: int | None = Field(None, ge=0, le=3, strict=True)
    # Accepted for OpenAI compatibility; they do not change diffusion sampling.
    style: Text | None = Field(None, max_length=256)
    moderation: Text | None = Field(None, max_length=256)
    safety_identifier: Text | None = Field(None, max_length=256)
    # Sent by the official client for other kinds of model (animation, vector art): refused with a clear 400.
    complexity: Any = None
    frame_count: Any = None
    frame_duration_ms: Any = None
    svg: Any = None
    # Diffusion fields.
    negative_prompt: Text | None = None
    num_inference_steps: int | None = Field(None, strict=True)
    guidance_scale: float | None = None
    guidance_rescale: float | None = Field(None, ge=0.0, le=1.0, description="φ of Lin et al. 2023 (0 = off)")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, strict=True)
    sampler: Text | None = Field(None, max_length=64)
    eta: float | None = Field(None, ge=0.0, le=1.0)
    # What the image is for: the release gate's policy decides on it (imagegen/gate/default_policy.toml).
    asset_type: Text = Field("campaign_background", max_length=64)
    claims_real_sku: bool = Field(False, strict=True)  # strict: "no" is not False
    contains_logo: bool = Field(False, strict=True)


class EditFields(BaseModel):
    """The non-file fields of POST /v1/images/edits (multipart, so every value arrives as text: lax types)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: Text
    model: Text | None = Field(None, max_length=256)
    n: int = 1
    size: Text | None = Field(None, max_length=32, description='"WxH"; without it, the aspect of the input')
    response_format: Text | None = Field(None, max_length=32)
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int | None = Field(None, ge=0, le=100)
    user: Text | None = Field(None, max_length=256)
    # Accepted for OpenAI compatibility; they do not change diffusion sampling.
    quality: Text | None = Field(None, max_length=32)
    background: Text | None = Field(None, max_length=32)
    moderation: Text | None = Field(None, max_length=256)
    input_fidelity: Text | None = Field(None, max_length=256)
    safety_identifier: Text | None = Field(None, max_length=256)
    stream: bool = False
    partial_images: int | None = Field(None, ge=0, le=3)
    # Diffusion and edit fields.
    negative_prompt: Text | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    guidance_rescale: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    sampler: Text | None = Field(None, max_length=64)
    eta: float | None = Field(None, ge=0.0, le=1.0)
    strength: float | None = Field(None, gt=0.0, le=1.0, description="how much of the plan re-draws the input")
    preserve_unmasked: bool | None = Field(None, description="put the input's pixels back where the mask keeps them")
    resize_mode: Literal["crop", "stretch", "pad"] = "crop"
    image_x: int | None = Field(None, ge=0, description="pad: the fitted image's left edge on the canvas")
    image_y: int | None = Field(None, ge=0, description="pad: the fitted image's top edge on the canvas")
    asset_type: Text = Field("campaign_background", max_length=64)
    claims_real_sku: bool = False
    contains_logo: bool = False


class KeptOut(BaseModel):
    """An edit's pixels that are the input's own (composited back before labelling)."""

    pixels: int
    blended: int
    fraction: float
    box: tuple[int, int, int, int] | None
    mask_sha256: str


class GenerationRecordOut(BaseModel):
    model: str
    sampler: str
    steps: int
    guidance_scale: float
    guidance_rescale: float
    seed: int
    eta: float
    width: int
    height: int
    negative_prompt: str
    strength: float | None = None
    input_sha256: str | None = None


class ReleaseOut(BaseModel):
    outcome: str
    labels: list[str]
    reasons: list[str]
    sha256: str | None
    watermark_payload: str | None
    kept: KeptOut | None = None  # edits with preserve_unmasked


class ImageOut(BaseModel):
    b64_json: str | None  # None while the image is held for review, or when it is sent as a URL
    url: str | None = None  # response_format=url: a signed link to the labelled bytes, valid for a while
    revised_prompt: str
    status: Literal["released", "pending_review"] = "released"
    review_id: str | None = None
    generation: GenerationRecordOut
    release: ReleaseOut

    @classmethod
    def from_held(cls, held: HeldForReview) -> ImageOut:
        return cls(
            b64_json=None,
            revised_prompt=held.record.prompt,
            status="pending_review",
            review_id=held.review_id,
            generation=GenerationRecordOut(**{k: v for k, v in held.record.as_dict().items() if k != "prompt"}),
            release=ReleaseOut(
                outcome="human_review", labels=[], reasons=list(held.reasons), sha256=None, watermark_payload=None
            ),
        )

    @classmethod
    def from_held_approved(
        cls, record: GenerationRecord, review_id: str, b64: str | None, sha256: str | None, url: str | None = None
    ) -> ImageOut:
        return cls(
            b64_json=b64,
            url=url,
            revised_prompt=record.prompt,
            review_id=review_id,
            generation=GenerationRecordOut(**{k: v for k, v in record.as_dict().items() if k != "prompt"}),
            release=ReleaseOut(
                outcome="approved_after_review", labels=[], reasons=[], sha256=sha256, watermark_payload=None
            ),
        )

    @classmethod
    def from_released(cls, image: ReleasedImage, url: str | None = None) -> ImageOut:
        """The image as base64, or as the URL it is served at."""
        r = image.record
        return cls(
            b64_json=None if url is not None else base64.b64encode(image.data).decode(),
            url=url,
            revised_prompt=r.prompt,
            generation=GenerationRecordOut(**{k: v for k, v in r.as_dict().items() if k != "prompt"}),
            release=ReleaseOut(
                outcome=image.decision.outcome,
                labels=list(image.decision.labels),
                reasons=list(image.decision.reasons),
                sha256=image.sha256,
                watermark_payload=image.decision.watermark,
                kept=None if image.decision.kept is None else KeptOut(**image.decision.kept.as_dict()),
            ),
        )


class InputTokens(BaseModel):
    text_tokens: int
    image_tokens: int


class OutputTokens(BaseModel):
    text_tokens: int = 0
    image_tokens: int


class Usage(BaseModel):
    """OpenAI's usage shape. Text tokens: the prompt's, as the model's primary tokenizer reads it (specials and
    what it cuts off not counted). Image tokens: latent positions (the denoiser's tokens: (H/8)·(W/8) for an SD
    VAE), per output image and, for an edit, for its input."""

    input_tokens: int
    input_tokens_details: InputTokens
    output_tokens: int
    output_tokens_details: OutputTokens
    total_tokens: int


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageOut]
    output_format: str
    size: str
    quality: str | None = None
    background: str = "opaque"
    usage: Usage | None = None


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "imagegen"
    family: str  # sd | sdxl | sd3 | flux
    samplers: list[str]  # what this model can run; others are refused with 400 unsupported_sampler
    guidance: str  # cfg (an uncond row per guided image) | embedded (w is a model input) | none
    negative_prompt: bool  # whether it takes one
    defaults: dict[str, Any]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]
