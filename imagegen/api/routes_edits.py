"""POST /v1/images/edits: OpenAI's edits route (multipart), answered with released images only.

``image`` (or ``image[]``: one, until reference images are supported) is the picture to edit; ``mask`` is a PNG
with alpha of the same size, alpha 0 where pixels are to change (OpenAI's convention). Uploads are PNG, JPEG or
WebP, bounded in bytes before they are read and in pixels before they are decoded. The other fields are
``EditFields``; ``Prefer: respond-async`` queues the edit as a job, as for generations.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile

from imagegen.api.access import GenerateCaller
from imagegen.api.deps import ServicesDep
from imagegen.api.edit_requests import no_upload, resolve_edit
from imagegen.api.errors import APIError
from imagegen.api.routes_images import ready_engine, run
from imagegen.api.schemas import EditFields, ImagesResponse
from imagegen.gate.policy import Use
from imagegen.logs import request_id
from imagegen.uploads import ImageTooLarge, NotAnImage, Upload, UploadError, read_upload

router = APIRouter()
_NO_RETRY = {"x-should-retry": "false"}  # the same upload gets the same answer
FILE_FIELDS = ("image", "image[]", "mask")
# Fields of the official client's edit call that belong to other kinds of model (animations, vector art).
UNSUPPORTED = frozenset({"complexity", "frame_count", "frame_duration_ms", "markup", "svg"})


def upload_refused(exc: UploadError, param: str) -> APIError:
    if isinstance(exc, NotAnImage):
        return APIError(415, "unsupported_media_type", f"{param}: send a PNG, JPEG or WebP image", param, _NO_RETRY)
    if isinstance(exc, ImageTooLarge):
        return APIError(413, "image_too_large", f"{param}: {exc}", param, _NO_RETRY)
    return APIError(400, "invalid_image", f"{param}: {exc}", param, _NO_RETRY)


def decode(data: bytes, param: str, max_pixels: int) -> Upload:
    try:
        return read_upload(data, max_pixels)
    except UploadError as exc:
        raise upload_refused(exc, param) from exc


async def read_form(request: Request, max_field_bytes: int) -> FormData:
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise APIError(415, "unsupported_media_type", "send the edit as multipart/form-data", headers=_NO_RETRY)
    # Bounded: a few files, a few dozen fields, each text field small (the body's total is bounded already).
    return await request.form(max_files=len(FILE_FIELDS) + 1, max_fields=64, max_part_size=max_field_bytes)


def fields_of(form: FormData) -> EditFields:
    values: dict[str, str] = {}
    for key, value in form.multi_items():
        if key in FILE_FIELDS:
            continue
        if key in UNSUPPORTED:
            raise APIError(400, "unsupported_parameter", f"{key} is not supported by this service", key)
        if not isinstance(value, str):
            raise APIError(400, "invalid_value", f"{key} must be a text field, not a file", key)
        if key in values:
            raise APIError(400, "invalid_value", f"{key} is given more than once", key)
        values[key] = value
    try:
        return EditFields.model_validate(values)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc


def files_of(form: FormData) -> tuple[UploadFile, UploadFile | None]:
    images = [v for k in ("image", "image[]") for v in form.getlist(k)]
    masks = form.getlist("mask")
    if not images:
        raise no_upload("image")
    if len(images) > 1:
        raise APIError(400, "unsupported_parameter", "one image is edited per call; reference images are not supported")
    if len(masks) > 1:
        raise APIError(400, "invalid_mask", "send at most one mask", "mask")
    image, mask = images[0], masks[0] if masks else None
    for name, value in (("image", image), ("mask", mask)):
        if value is not None and not isinstance(value, UploadFile):
            raise APIError(400, "invalid_value", f"{name} must be a file upload", name)
    assert isinstance(image, UploadFile) and (mask is None or isinstance(mask, UploadFile))
    return image, mask


def repaint_of(mask: Upload) -> np.ndarray:
    """OpenAI's mask: fully transparent (alpha 0) where the image is to change."""
    if mask.alpha is None:
        raise APIError(400, "invalid_mask", "the mask must be a PNG with an alpha channel (alpha 0 = change)", "mask")
    return 1.0 - mask.alpha.astype(np.float32) / 255.0


def form_schema() -> dict[str, Any]:
    """The multipart body as OpenAPI describes it (the route parses the form itself, to bound it and to take
    OpenAI's ``image[]``): EditFields plus the two files."""
    schema = EditFields.model_json_schema()
    files = {"image": {"type": "string", "format": "binary"}, "mask": {"type": "string", "format": "binary"}}
    body = {**schema, "properties": {**files, **schema["properties"]}, "required": ["image", *schema["required"]]}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": body}}}}


@router.post(
    "/v1/images/edits",
    response_model=ImagesResponse,
    responses={202: {"description": "job queued"}},
    openapi_extra=form_schema(),
)
async def edit(
    services: ServicesDep,
    caller: GenerateCaller,
    request: Request,
    prefer: Annotated[str | None, Header()] = None,
) -> ImagesResponse | JSONResponse | StreamingResponse:
    engine = ready_engine(services)
    settings = services.settings
    form = await read_form(request, settings.max_json_body_bytes)
    try:
        fields = fields_of(form)
        image_file, mask_file = files_of(form)
        image_bytes = await image_file.read()
        mask_bytes = None if mask_file is None else await mask_file.read()
    finally:
        await form.close()
    image = await asyncio.to_thread(decode, image_bytes, "image", settings.max_upload_pixels)
    repaint = None
    if mask_bytes is not None:
        mask = await asyncio.to_thread(decode, mask_bytes, "mask", settings.max_upload_pixels)
        repaint = repaint_of(mask)
    req = await asyncio.to_thread(resolve_edit, fields, image, repaint, services.models, settings, request_id())
    use = Use(fields.asset_type, fields.claims_real_sku, fields.contains_logo)
    return await run(services, engine, caller, request, prefer, use, req, "image_edit" if fields.stream else None)
