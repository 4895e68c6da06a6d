"""An edit (the OpenAI edits route or AUTOMATIC1111's img2img) resolved into a GenerationRequest with an input.

Without a mask an edit is img2img: the whole picture is re-drawn from the input, ``strength`` of the way (0.8 by
default). With a mask (or a padded canvas) it is inpainting: the masked pixels are generated (strength 1 by
default) and, with ``preserve_unmasked`` (the default then), every other pixel is the input's own.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from imagegen.api.edit_inputs import default_size, place
from imagegen.api.errors import APIError
from imagegen.api.schemas import EditFields, ImageGenerationBody
from imagegen.api.validation import bad, pick_model, resolve
from imagegen.engine.request import GenerationRequest
from imagegen.pipeline.loading import LoadedModel
from imagegen.settings import Settings
from imagegen.uploads import Upload

IMG2IMG_STRENGTH = 0.8  # diffusers' img2img default
SHARED_FIELDS = tuple(f for f in ImageGenerationBody.model_fields if f in EditFields.model_fields)


def resolve_edit(
    fields: EditFields,
    image: Upload,
    repaint: np.ndarray | None,
    models: dict[str, LoadedModel],
    settings: Settings,
    request_id: str = "",
) -> GenerationRequest:
    """``repaint``: (H, W) float at the input's size, 1 where pixels are generated; None for img2img."""
    height, width = image.rgb.shape[:2]
    if repaint is not None and repaint.shape != (height, width):
        message = f"the mask is {repaint.shape[1]}x{repaint.shape[0]}, the image {width}x{height}: they must match"
        raise bad("invalid_mask", message, "mask")
    model = pick_model(fields.model, models, settings)
    values = {f: getattr(fields, f) for f in SHARED_FIELDS}
    if fields.size is None or fields.size == "auto":
        d = model.defaults
        w, h = default_size(width, height, d.width * d.height, model.size_multiple)
        values["size"] = f"{w}x{h}"
    req = resolve(ImageGenerationBody(**values), models, settings, request_id)
    canvas = place(image.rgb, repaint, req.width, req.height, fields.resize_mode, (fields.image_x, fields.image_y))
    if canvas.repaint is not None and not (canvas.repaint >= 0.5).any():
        raise bad("invalid_mask", "the mask marks no pixel to change (alpha 0 marks what to change)", "mask")
    if model.family.needs_mask and canvas.repaint is None:
        raise bad("mask_required", f"{model.name} is an inpainting model: send a mask", "mask")
    sampler = model.family.samplers[req.sampler]
    if not sampler.runs_edits:
        raise bad("unsupported_sampler", f"{req.sampler} does not run edits on {model.name}", "sampler")
    strength = fields.strength or (1.0 if canvas.repaint is not None else IMG2IMG_STRENGTH)
    if model.family.start_step(req.steps, strength) >= req.steps:
        raise bad("invalid_strength", f"strength {strength} leaves no step of {req.steps} to run", "strength")
    preserve = canvas.repaint is not None and fields.preserve_unmasked is not False
    return replace(
        req,
        init_image=canvas.image,
        mask=canvas.repaint,
        strength=strength,
        preserve_unmasked=preserve,
        edit_source=image,
        input_images=1,
    )


def no_upload(param: str) -> APIError:
    return bad("missing_field", f"{param} is required: the image to edit", param)
