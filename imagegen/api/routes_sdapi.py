"""AUTOMATIC1111's ``POST /sdapi/v1/img2img``, mapped onto the same edit request as /v1/images/edits.

The field names and defaults are A1111's: base64 ``init_images`` (the first is edited) and ``mask`` (white =
repaint, ``inpainting_mask_invert`` flips it), ``denoising_strength``, ``mask_blur`` (a Gaussian blur of the mask,
in pixels), ``inpainting_fill`` (0 fills the masked area with the kept area's mean colour before noising; 1 keeps
the original; 2 and 3, latent noise/nothing, start as 1 does), ``resize_mode`` (0 stretch, 1 crop, 2 pad; 3, a
latent upscale, resizes as 0), ``steps``, ``cfg_scale``, ``width``, ``height``, ``seed`` (-1: random),
``sampler_name``, ``batch_size`` × ``n_iter``. ``inpaint_full_res`` and its padding are accepted and not applied:
the whole canvas is inpainted (the answer's ``info`` says so). The answer is A1111's: ``images`` (base64, each
released by the gate), ``parameters`` (the request as read) and ``info`` (a JSON string); images held for review
are not in ``images`` and are listed in ``info``'s ``pending_review``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from PIL import Image, ImageFilter
from pydantic import BaseModel, ConfigDict, Field

from imagegen.api.access import GenerateCaller
from imagegen.api.deps import ServicesDep
from imagegen.api.edit_requests import no_upload, resolve_edit
from imagegen.api.errors import APIError
from imagegen.api.routes_edits import decode
from imagegen.api.routes_images import ready_engine, run
from imagegen.api.schemas import EditFields, ImagesResponse, Text
from imagegen.gate.policy import Use
from imagegen.logs import request_id

router = APIRouter()
RESIZE_MODES: dict[int, Literal["crop", "stretch", "pad"]] = {0: "stretch", 1: "crop", 2: "pad", 3: "stretch"}
SAMPLER_NAMES = {  # A1111's names (and its scheduler-suffixed forms) → ours
    "ddim": "ddim",
    "euler": "euler",
    "euler a": "euler_a",
    "dpm++ 2m": "dpmpp_2m",
    "dpm++ 2m karras": "dpmpp_2m",
    "lcm": "lcm",
}


class Img2ImgBody(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # A1111 clients send dozens of UI fields

    init_images: list[str] = Field(min_length=1, max_length=8)
    mask: str | None = None
    prompt: Text = ""
    negative_prompt: Text = ""
    denoising_strength: float = Field(0.75, gt=0.0, le=1.0)
    steps: int = Field(20, strict=True)
    cfg_scale: float = 7.0
    width: int = Field(512, strict=True)
    height: int = Field(512, strict=True)
    seed: int = Field(-1, ge=-1, le=2**32 - 1, strict=True)
    sampler_name: Text | None = Field(None, max_length=64)
    batch_size: int = Field(1, ge=1, strict=True)
    n_iter: int = Field(1, ge=1, strict=True)
    mask_blur: int = Field(4, ge=0, le=64, strict=True)
    inpainting_fill: int = Field(1, ge=0, le=3, strict=True)
    inpaint_full_res: bool | int = False
    inpaint_full_res_padding: int = 32
    inpainting_mask_invert: int = Field(0, ge=0, le=1, strict=True)
    resize_mode: int = Field(0, ge=0, le=3, strict=True)
    override_settings: dict[str, Any] = Field(default_factory=dict)


def b64_image(value: str) -> bytes:
    """A1111 sends raw base64 or a data URL."""
    _, _, payload = value.partition(",") if value.startswith("data:") else ("", "", value)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise APIError(400, "invalid_image", "init_images and mask must be base64 images", "init_images") from exc


def repaint_of(rgb: np.ndarray, blur: int, invert: bool) -> np.ndarray:
    """A1111's mask: white repaints; blurred by ``mask_blur`` pixels (Gaussian), as its UI does."""
    gray = Image.fromarray(rgb).convert("L")
    if blur:
        gray = gray.filter(ImageFilter.GaussianBlur(blur))
    repaint = np.asarray(gray, dtype=np.float32) / 255.0
    return 1.0 - repaint if invert else repaint


def fill_masked(rgb: np.ndarray, repaint: np.ndarray) -> np.ndarray:
    """inpainting_fill 0: the area to repaint starts as the mean colour of what is kept."""
    keep = repaint < 0.5
    if not keep.any():
        return rgb
    out = rgb.copy()
    out[~keep] = rgb[keep].mean(axis=0).round().astype(np.uint8)
    return out


@router.post("/sdapi/v1/img2img")
async def img2img(body: Img2ImgBody, services: ServicesDep, caller: GenerateCaller, request: Request) -> dict[str, Any]:
    engine = ready_engine(services)
    settings = services.settings
    if not body.init_images[0]:
        raise no_upload("init_images")
    image = await asyncio.to_thread(decode, b64_image(body.init_images[0]), "init_images", settings.max_upload_pixels)
    repaint = None
    if body.mask:
        mask = await asyncio.to_thread(decode, b64_image(body.mask), "mask", settings.max_upload_pixels)
        repaint = repaint_of(mask.rgb, body.mask_blur, bool(body.inpainting_mask_invert))
        if body.inpainting_fill == 0 and repaint.shape == image.rgb.shape[:2]:
            image = type(image)(image.data, image.format, fill_masked(image.rgb, repaint), image.alpha)
    sampler = None
    if body.sampler_name is not None:
        sampler = SAMPLER_NAMES.get(body.sampler_name.lower(), body.sampler_name)
    fields = EditFields(
        prompt=body.prompt,
        model=body.override_settings.get("sd_model_checkpoint"),
        n=body.batch_size * body.n_iter,
        size=f"{body.width}x{body.height}",
        negative_prompt=body.negative_prompt or None,
        num_inference_steps=body.steps,
        guidance_scale=body.cfg_scale,
        seed=None if body.seed == -1 else body.seed,
        sampler=sampler,
        strength=body.denoising_strength,
        resize_mode=RESIZE_MODES[body.resize_mode],
    )
    req = await asyncio.to_thread(resolve_edit, fields, image, repaint, services.models, settings, request_id())
    answer = await run(services, engine, caller, request, None, Use(fields.asset_type, False, False), req)
    assert isinstance(answer, ImagesResponse)  # never queued: A1111's API has no jobs
    released = [d for d in answer.data if d.b64_json is not None]
    notes = ["inpaint_full_res is not applied: the whole canvas was inpainted"] if body.inpaint_full_res else []
    info = {
        "prompt": req.prompt,
        "negative_prompt": req.negative_prompt or "",
        "seed": req.seed,
        "all_seeds": [req.seed + i for i in range(req.n)],
        "steps": req.steps,
        "cfg_scale": req.guidance_scale,
        "sampler_name": req.sampler,
        "width": req.width,
        "height": req.height,
        "denoising_strength": req.strength,
        "sd_model_name": req.model,
        "pending_review": [d.review_id for d in answer.data if d.b64_json is None],
        "release": [d.release.model_dump() for d in released],
        "notes": notes,
    }
    parameters = body.model_dump(exclude={"init_images", "mask"})
    return {"images": [d.b64_json for d in released], "parameters": parameters, "info": json.dumps(info)}
