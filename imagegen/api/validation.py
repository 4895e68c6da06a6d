"""Resolve a request body against the settings and the chosen model: defaults filled, bounds checked.

Every failure is an ``APIError`` naming the offending field, raised before any work is queued.
"""

from __future__ import annotations

import re
import secrets

from imagegen.api.errors import APIError
from imagegen.api.schemas import ImageGenerationBody
from imagegen.engine.request import GenerationRequest, OutputSpec
from imagegen.pipeline.loading import LoadedModel
from imagegen.samplers import SAMPLERS
from imagegen.settings import Settings

SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")  # ASCII digits, the whole string (no trailing newline)


def bad(code: str, message: str, param: str) -> APIError:
    return APIError(400, code, message, param)


QUALITY = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high",
           "standard": "medium", "hd": "high"}  # fmt: skip  # OpenAI's levels (GPT Image, DALL·E 3) → our presets
OTHER_MEDIA = ("complexity", "frame_count", "frame_duration_ms", "svg")  # the client's fields for animation, SVG


def pick_model(name: str | None, models: dict[str, LoadedModel], settings: Settings) -> LoadedModel:
    if name is not None and name not in models:
        name = settings.aliases().get(name, name)
    if name is None:
        name = settings.default_model if settings.default_model in models else next(iter(models), None)
        if name is None:
            raise APIError(503, "no_models", "no model is loaded")
    if name not in models:
        raise APIError(404, "model_not_found", f"model {name!r} does not exist; see GET /v1/models", "model")
    return models[name]


def parse_size(size: str | None, model: LoadedModel, settings: Settings) -> tuple[int, int]:
    if size is None or size == "auto":
        return model.defaults.width, model.defaults.height
    m = SIZE.fullmatch(size)
    if not m:
        raise bad("invalid_size", f'size must look like "512x512", got {size!r}', "size")
    width, height = int(m.group(1)), int(m.group(2))
    k = model.size_multiple
    if width < k or height < k or width % k or height % k:
        raise bad("size_not_supported", f"width and height must be positive multiples of {k} for this model", "size")
    longest = model.family.max_side
    if longest is not None and max(width, height) > longest:
        raise bad("size_not_supported", f"this model's sides can be at most {longest} pixels", "size")
    if width * height > settings.max_pixels:
        raise bad("size_not_supported", f"{width}x{height} exceeds the limit of {settings.max_pixels} pixels", "size")
    native = model.defaults.width * model.defaults.height
    if width * height > settings.max_area_factor * native:  # far past its training size a model makes noise
        raise bad(
            "size_not_supported",
            f"{width}x{height} is over {settings.max_area_factor:g}× the area of this model's native "
            f"{model.defaults.width}x{model.defaults.height}",
            "size",
        )
    return width, height


def resolve(
    body: ImageGenerationBody, models: dict[str, LoadedModel], settings: Settings, request_id: str = ""
) -> GenerationRequest:
    model = pick_model(body.model, models, settings)
    d = model.defaults
    if not body.prompt.strip():
        raise bad("invalid_prompt", "prompt must not be empty", "prompt")
    for field, text in (("prompt", body.prompt), ("negative_prompt", body.negative_prompt or "")):
        if len(text) > settings.max_prompt_chars:
            raise bad("prompt_too_long", f"{field} is longer than {settings.max_prompt_chars} characters", field)
    if body.response_format not in (None, "b64_json", "url"):
        raise bad("unsupported_response_format", "response_format is b64_json or url", "response_format")
    for field in OTHER_MEDIA:
        if getattr(body, field) is not None:
            raise bad("unsupported_parameter", f"{field} is for other kinds of model; this service makes images", field)
    if body.background not in (None, "auto", "opaque"):
        message = "this service makes opaque images only" if body.background == "transparent" else "opaque or auto"
        raise bad(
            "unsupported_parameter" if body.background == "transparent" else "invalid_value", message, "background"
        )
    if body.quality not in (None, "auto", *QUALITY):
        raise bad("invalid_value", f"quality is one of auto, {', '.join(QUALITY)}", "quality")
    if not 1 <= body.n <= settings.max_images:
        raise bad("invalid_n", f"n must be between 1 and {settings.max_images}", "n")
    width, height = parse_size(body.size, model, settings)
    samplers = model.family.samplers
    sampler = body.sampler or d.sampler
    if sampler not in SAMPLERS:
        raise bad("unknown_sampler", f"sampler must be one of {sorted(SAMPLERS)}", "sampler")
    if sampler not in samplers:
        raise bad(
            "unsupported_sampler",
            f"{model.name} ({model.family.name}) cannot run {sampler}; it supports {', '.join(sorted(samplers))}",
            "sampler",
        )
    if body.negative_prompt and not model.family.negative_prompt:
        raise bad(
            "unsupported_parameter",
            f"{model.name} ({model.family.name}) takes no negative prompt: its guidance is distilled into the model",
            "negative_prompt",
        )
    steps = body.num_inference_steps
    if steps is None:
        steps = d.steps if body.quality in (None, "auto") else d.steps_for(QUALITY[body.quality])
    limit = min(settings.max_steps, samplers[sampler].max_steps())
    if not 1 <= steps <= limit:
        raise bad(
            "invalid_steps", f"num_inference_steps must be between 1 and {limit} for {sampler}", "num_inference_steps"
        )
    guidance = body.guidance_scale if body.guidance_scale is not None else d.guidance_scale
    if not 0 <= guidance <= settings.max_guidance_scale:
        raise bad(
            "invalid_guidance_scale",
            f"guidance_scale must be between 0 and {settings.max_guidance_scale}",
            "guidance_scale",
        )
    return GenerationRequest(
        model=model.name,
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        n=body.n,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=float(guidance),
        guidance_rescale=float(body.guidance_rescale if body.guidance_rescale is not None else d.guidance_rescale),
        seed=body.seed if body.seed is not None else secrets.randbelow(2**32),
        sampler=sampler,
        eta=float(body.eta or 0.0),
        output=OutputSpec(
            format=body.output_format, compression=body.output_compression, url=body.response_format == "url"
        ),
        request_id=request_id,
        user=body.user,
        quality=QUALITY.get(body.quality or "auto"),
        partial_images=body.partial_images or 0,
    )
