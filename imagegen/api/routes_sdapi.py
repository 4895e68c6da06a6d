"""AUTOMATIC1111's web API (``/sdapi/v1``): txt2img and img2img mapped onto our requests, run through the same
screening, quota, engine and release gate as /v1/images; the model and sampler lists; progress and interrupt.

img2img's field names and defaults are A1111's: base64 ``init_images`` (the first is edited) and ``mask`` (white =
repaint, ``inpainting_mask_invert`` flips it), ``denoising_strength``, ``mask_blur`` (a Gaussian blur of the mask,
in pixels), ``inpainting_fill`` (0 fills the masked area with the kept area's mean colour before noising; 1 keeps
the original; 2 and 3, latent noise/nothing, start as 1 does), ``resize_mode`` (0 stretch, 1 crop, 2 pad; 3, a
latent upscale, resizes as 0), ``steps``, ``cfg_scale``, ``width``, ``height``, ``seed`` (-1: random),
``sampler_name``, ``batch_size`` × ``n_iter``. ``inpaint_full_res`` and its padding are accepted and not applied:
the whole canvas is inpainted (the answer's ``info`` says so). txt2img takes the same generation fields; its
hires-fix fields (``enable_hr``, ``hr_scale``, ``denoising_strength``, …) are accepted and not applied (``info``
says so). ``override_settings.sd_model_checkpoint`` picks the model (its name, or its sd-models title). The answer is
A1111's: ``images`` (base64, each released by the gate), ``parameters`` (the request as read) and ``info`` (a JSON
string); images held for review are not in ``images`` and are listed in ``info``'s ``pending_review``.

A1111's API has no job ids: progress and interrupt act on the caller's own jobs submitted here (with API keys,
one key never sees or stops another's), kept in a small per-app registry.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, FastAPI, Request
from PIL import Image, ImageFilter
from pydantic import BaseModel, ConfigDict, Field

from imagegen import a1111
from imagegen.api.access import CallerDep, GenerateCaller
from imagegen.api.deps import Services, ServicesDep
from imagegen.api.edit_requests import no_upload, resolve_edit
from imagegen.api.errors import APIError
from imagegen.api.keys import Caller
from imagegen.api.responses import job_progress
from imagegen.api.routes_edits import decode
from imagegen.api.routes_images import ready_engine, run
from imagegen.api.schemas import EditFields, ImageGenerationBody, ImagesResponse, Text
from imagegen.api.validation import resolve
from imagegen.engine.request import GenerationRequest, Job
from imagegen.gate.labels import a1111_parameters
from imagegen.gate.policy import Use
from imagegen.logs import request_id

router = APIRouter()
PROGRESS_PREVIEWS = 3  # partial images per image of an sdapi request, shown by /progress
RESIZE_MODES: dict[int, Literal["crop", "stretch", "pad"]] = {0: "stretch", 1: "crop", 2: "pad", 3: "stretch"}
SAMPLER_NAMES = a1111.SAMPLER_NAMES  # A1111's names (any case), its aliases and ours → ours
# Our field names in validation errors → A1111's
A1111_PARAMS = {
    "size": "width",
    "num_inference_steps": "steps",
    "guidance_scale": "cfg_scale",
    "sampler": "sampler_name",
    "n": "batch_size",
    "model": "override_settings.sd_model_checkpoint",
    "strength": "denoising_strength",
    "image": "init_images",
}
# txt2img's hires fix (a second, img2img pass at a larger size): accepted, not applied
HIRES_FIELDS = (
    "enable_hr", "denoising_strength", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x",
    "hr_resize_y", "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt",
    "firstphase_width", "firstphase_height",
)  # fmt: skip
TITLE = re.compile(r"(.+) \[[0-9a-f]{10}\]")  # sd-models' title: "name [hash]"


class OverrideSettings(BaseModel):
    """A1111's per-request settings: only the checkpoint is read; the others are kept for ``parameters``."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    sd_model_checkpoint: Text | None = Field(None, max_length=256)


class A1111Body(BaseModel):
    """The fields txt2img and img2img share."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # A1111 clients send dozens of UI fields

    prompt: Text = ""
    negative_prompt: Text = ""
    steps: int = Field(20, strict=True)
    cfg_scale: float = 7.0
    width: int = Field(512, strict=True)
    height: int = Field(512, strict=True)
    seed: int = Field(-1, ge=-1, le=2**32 - 1, strict=True)
    sampler_name: Text | None = Field(None, max_length=64)
    scheduler: Text | None = Field(None, max_length=64)  # A1111 1.9+: "Automatic", "Karras", … (not applied)
    batch_size: int = Field(1, ge=1, strict=True)
    n_iter: int = Field(1, ge=1, strict=True)
    override_settings: OverrideSettings = Field(default_factory=OverrideSettings)

    def sampler(self) -> str | None:
        return None if self.sampler_name is None else a1111.our_sampler(self.sampler_name)

    def request_fields(self) -> dict[str, Any]:
        """The fields txt2img and img2img share, in our request's names."""
        return {
            "prompt": self.prompt, "model": self.model(), "n": self.batch_size * self.n_iter,
            "size": f"{self.width}x{self.height}", "negative_prompt": self.negative_prompt or None,
            "num_inference_steps": self.steps, "guidance_scale": self.cfg_scale,
            "seed": None if self.seed == -1 else self.seed, "sampler": self.sampler(),
        }  # fmt: skip

    def model(self) -> str | None:
        return checkpoint(self.override_settings.sd_model_checkpoint)

    def sampler_notes(self) -> list[str]:
        notes = []
        if self.sampler_name is not None and self.sampler_name.lower() in a1111.SUFFIXED:
            ours = a1111.display_name(a1111.SUFFIXED[self.sampler_name.lower()])
            notes.append(f"sampler {self.sampler_name!r} ran as {ours!r} on the model's own noise schedule")
        if self.scheduler is not None and self.scheduler.lower() not in ("", "automatic"):
            notes.append(f"scheduler {self.scheduler!r} is not applied: the model's own noise schedule was used")
        return notes


class Txt2ImgBody(A1111Body):
    enable_hr: bool | int = False
    denoising_strength: float | None = None
    hr_scale: float = 2.0
    hr_upscaler: Text | None = Field(None, max_length=256)
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: Text | None = Field(None, max_length=256)
    hr_sampler_name: Text | None = Field(None, max_length=64)
    hr_scheduler: Text | None = Field(None, max_length=64)
    hr_prompt: Text = ""
    hr_negative_prompt: Text = ""
    firstphase_width: int = 0
    firstphase_height: int = 0


class Img2ImgBody(A1111Body):
    init_images: list[str] = Field(min_length=1, max_length=8)
    mask: str | None = None
    denoising_strength: float = Field(0.75, gt=0.0, le=1.0)
    mask_blur: int = Field(4, ge=0, le=64, strict=True)
    inpainting_fill: int = Field(1, ge=0, le=3, strict=True)
    inpaint_full_res: bool | int = False
    inpaint_full_res_padding: int = 32
    inpainting_mask_invert: int = Field(0, ge=0, le=1, strict=True)
    resize_mode: int = Field(0, ge=0, le=3, strict=True)


def checkpoint(value: str | None) -> str | None:
    """``sd_model_checkpoint``: a model's name, or its sd-models title ("name [hash]") as A1111 clients send it."""
    if value is None:
        return None
    title = TITLE.fullmatch(value)
    return title.group(1) if title else value


@contextmanager
def a1111_params() -> Iterator[None]:
    """A validation error names the A1111 field the client sent, not ours."""
    try:
        yield
    except APIError as exc:
        if exc.param is not None:
            exc.param = A1111_PARAMS.get(exc.param, exc.param)
        raise


# ---- the per-app registry of sdapi jobs, and the models' short hashes ------------------------------------------
class SdapiJobs:
    """The unfinished jobs submitted through /sdapi/v1, per key, oldest first: what /progress and /interrupt act on.
    A job leaves when its future resolves (on the engine's threads, hence the lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, list[Job]] = {}

    def add(self, owner: str, job: Job) -> None:
        with self._lock:
            self._jobs.setdefault(owner, []).append(job)
        job.future.add_done_callback(lambda _: self._remove(owner, job))  # runs now if it is already done

    def _remove(self, owner: str, job: Job) -> None:
        with self._lock:
            jobs = self._jobs.get(owner, [])
            if job in jobs:
                jobs.remove(job)
            if not jobs:
                self._jobs.pop(owner, None)

    def unfinished(self, owner: str) -> list[Job]:
        with self._lock:
            return [job for job in self._jobs.get(owner, ()) if not job.done]


class SdapiState:
    def __init__(self) -> None:
        self.jobs = SdapiJobs()
        self._hashes: dict[Path, str | None] = {}

    def model_hash(self, folder: Path) -> str | None:
        if folder not in self._hashes:
            self._hashes[folder] = folder_hash(folder)
        return self._hashes[folder]


def sdapi_state(app: FastAPI) -> SdapiState:
    """The app's sdapi state, made on first use (no await between the look-up and the store: no race)."""
    state: SdapiState | None = getattr(app.state, "sdapi", None)
    if state is None:
        state = app.state.sdapi = SdapiState()
    return state


NOT_MODEL_FILES = frozenset({".md", ".png", ".jpg", ".jpeg", ".webp", ".gif"})  # a folder's docs and samples
HASH_SAMPLE_OFFSET, HASH_SAMPLE_BYTES = 0x100000, 0x10000


def folder_hash(folder: Path) -> str | None:
    """A short, stable hash of a diffusers folder (10 hex digits, as A1111's short hashes are): SHA-256 over each
    model file's relative path, size and 64 KiB read at 1 MiB (from the start of a smaller file), as A1111's
    legacy model hash samples a checkpoint. Weights are not read whole, so it is no file's SHA-256. None when the
    folder cannot be read."""
    digest = hashlib.sha256()
    try:
        files = sorted(
            path
            for path in folder.rglob("*")
            if path.is_file()
            and path.suffix.lower() not in NOT_MODEL_FILES
            and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        )
        for path in files:
            size = path.stat().st_size
            with path.open("rb") as f:
                f.seek(HASH_SAMPLE_OFFSET if size >= HASH_SAMPLE_OFFSET + HASH_SAMPLE_BYTES else 0)
                sample = f.read(HASH_SAMPLE_BYTES)
            digest.update(f"{path.relative_to(folder).as_posix()}\0{size}\0".encode())
            digest.update(sample)
    except OSError:
        return None
    return digest.hexdigest()[:10]


# ---- answers -------------------------------------------------------------------------------------------------
def a1111_answer(
    req: GenerationRequest,
    answer: ImagesResponse,
    parameters: dict[str, Any],
    notes: list[str],
    denoising_strength: float | None,
) -> dict[str, Any]:
    """A1111's ``{"images", "parameters", "info"}`` for a finished request (txt2img and img2img alike)."""
    released = [d for d in answer.data if d.status == "released"]
    info = {
        "prompt": req.prompt,
        "negative_prompt": req.negative_prompt or "",
        "seed": req.seed,
        "all_seeds": [req.seed + i for i in range(req.n)],
        "steps": req.steps,
        "cfg_scale": req.guidance_scale,
        "sampler_name": a1111.display_name(req.sampler),
        "width": req.width,
        "height": req.height,
        "denoising_strength": denoising_strength,
        "sd_model_name": req.model,
        # each released image's PNG-info text, as A1111 clients read it from here
        "infotexts": [a1111_parameters({**d.generation.model_dump(), "prompt": d.revised_prompt}) for d in released],
        "pending_review": [d.review_id for d in answer.data if d.status == "pending_review"],
        "release": [d.release.model_dump() for d in released],
        "notes": notes,
    }
    return {"images": [d.b64_json for d in released], "parameters": parameters, "info": json.dumps(info)}


async def run_a1111(
    services: Services, caller: Caller, request: Request, use: Use, req: GenerationRequest
) -> ImagesResponse:
    """``routes_images.run`` (screening, quota, engine, release gate), with the job in the caller's sdapi jobs and
    previews for /progress's ``current_image``."""
    jobs = sdapi_state(request.app).jobs
    req = replace(req, partial_images=PROGRESS_PREVIEWS)
    answer = await run(
        services,
        ready_engine(services),
        caller,
        request,
        None,
        use,
        req,
        on_submit=lambda job: jobs.add(caller.name, job),
        partials=True,
    )
    assert isinstance(answer, ImagesResponse)  # never queued: A1111's API has no jobs
    return answer


@router.post("/sdapi/v1/txt2img")
async def txt2img(body: Txt2ImgBody, services: ServicesDep, caller: GenerateCaller, request: Request) -> dict[str, Any]:
    ready_engine(services)
    generation = ImageGenerationBody(**body.request_fields())
    with a1111_params():
        req = resolve(generation, services.models, services.settings, request_id())
    if services.models[req.model].family.needs_mask:
        message = f"{req.model} is an inpainting model: use /sdapi/v1/img2img with a mask"
        raise APIError(400, "mask_required", message, "override_settings.sd_model_checkpoint")
    use = Use(generation.asset_type, generation.claims_real_sku, generation.contains_logo)
    answer = await run_a1111(services, caller, request, use, req)
    notes = body.sampler_notes()
    hires = [name for name in HIRES_FIELDS if name in body.model_fields_set]
    if hires:
        notes.append(f"not applied (this service runs no hires-fix pass): {', '.join(hires)}")
    return a1111_answer(req, answer, body.model_dump(), notes, None)


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
    ready_engine(services)
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
    fields = EditFields(
        **body.request_fields(),
        strength=body.denoising_strength,
        resize_mode=RESIZE_MODES[body.resize_mode],
    )
    with a1111_params():
        req = await asyncio.to_thread(resolve_edit, fields, image, repaint, services.models, settings, request_id())
    answer = await run_a1111(services, caller, request, Use(fields.asset_type, False, False), req)
    notes = body.sampler_notes()
    if body.inpaint_full_res:
        notes.append("inpaint_full_res is not applied: the whole canvas was inpainted")
    parameters = body.model_dump(exclude={"init_images", "mask"})
    return a1111_answer(req, answer, parameters, notes, req.strength)


# ---- models and samplers -------------------------------------------------------------------------------------
@router.get("/sdapi/v1/sd-models")
async def sd_models(services: ServicesDep, caller: CallerDep, request: Request) -> list[dict[str, Any]]:
    """One entry per loaded model, in A1111's shape. ``filename`` is the model's folder name (never a server
    path); ``sha256`` is null: a diffusers folder has no single checkpoint file to hash."""
    state, models = sdapi_state(request.app), list(services.models.values())
    hashes = await asyncio.to_thread(lambda: [state.model_hash(m.path) for m in models])  # reads a little of each file
    return [
        {
            "title": m.name if h is None else f"{m.name} [{h}]",
            "model_name": m.name,
            "hash": h,
            "sha256": None,
            "filename": m.path.name,
            "config": None,
        }
        for m, h in zip(models, hashes, strict=True)
    ]


@router.get("/sdapi/v1/samplers")
async def samplers(services: ServicesDep, caller: CallerDep) -> list[dict[str, Any]]:
    """The samplers some loaded model can run, by A1111's names; ``aliases`` include ours."""
    runnable = {name for m in services.models.values() for name in m.family.samplers}
    ordered = [s for s in a1111.DISPLAY_NAMES if s in runnable] + sorted(runnable - set(a1111.DISPLAY_NAMES))
    out = []
    for ours in ordered:
        name = a1111.display_name(ours)
        aliases = ([ours] if ours != name else []) + list(a1111.ALIASES.get(ours, ()))
        out.append({"name": name, "aliases": aliases, "options": dict(a1111.OPTIONS.get(ours, {}))})
    return out


# ---- progress and interrupt ----------------------------------------------------------------------------------
def current_image(job: Job) -> str | None:
    """The job's latest preview as A1111 sends it (base64), or None: a partial image the gate released (labelled
    and signed like any image); a held request has none."""
    if not job.partials:
        return None
    return base64.b64encode(job.partials[-1].image.data).decode()


def idle_state() -> dict[str, Any]:
    return {
        "skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
        "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0,
    }  # fmt: skip


@router.get("/sdapi/v1/progress")
async def progress(
    services: ServicesDep, caller: CallerDep, request: Request, skip_current_image: bool = False
) -> dict[str, Any]:
    """The caller's most recent unfinished sdapi request: its fraction of denoising steps done and an ETA from the
    rate so far; the idle shape when there is none."""
    jobs = sdapi_state(request.app).jobs.unfinished(caller.name)
    if not jobs or services.engine is None:
        return {"progress": 0.0, "eta_relative": 0.0, "state": idle_state(), "current_image": None, "textinfo": None}
    job = jobs[-1]
    done = job_progress(job, services.engine)
    fraction = float(done["fraction"])
    elapsed = time.monotonic() - job.submitted_at
    step = min((row.step for row in job.rows), default=0)  # an image's step (a request's images step together)
    if job.state == "queued":
        text = f"queued (position {done['queue_position']})"
    else:
        text = f"step {step}/{job.request.steps}" if done["step"] < done["total_steps"] else "releasing"
    state = {
        **idle_state(),
        "interrupted": job.cancel_requested,
        "job": job.id,
        "job_count": len(jobs),
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
        "sampling_step": step,
        "sampling_steps": job.request.steps,
    }
    return {
        "progress": fraction,
        "eta_relative": round(elapsed * (1 - fraction) / fraction, 3) if fraction > 0 else 0.0,
        "state": state,
        "current_image": None if skip_current_image else current_image(job),
        "textinfo": text,
    }


@router.post("/sdapi/v1/skip")  # A1111 skips the current image of a batch; our images run together: all stop
@router.post("/sdapi/v1/interrupt")
async def interrupt(services: ServicesDep, caller: CallerDep, request: Request) -> dict[str, Any]:
    """Cancel the caller's unfinished sdapi requests at their next step boundary; each answers 409 job_cancelled."""
    jobs = sdapi_state(request.app).jobs.unfinished(caller.name)
    if services.engine is not None:
        for job in jobs:
            services.engine.cancel(job)
    return {"interrupted": len(jobs)}
