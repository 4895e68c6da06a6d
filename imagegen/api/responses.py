"""Response bodies built from engine objects: released images and job status."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from imagegen.api.deps import Services
from imagegen.api.schemas import ImageOut, ImagesResponse, InputTokens, OutputTokens, Usage
from imagegen.engine.engine import Engine
from imagegen.engine.request import GenerationRequest, GenerationResult, Job
from imagegen.gate import ReleasedImage
from imagegen.state.results import ResultStore


@dataclass(frozen=True)
class Links:
    """Where ``response_format: "url"`` results are stored, and the absolute base of their URLs."""

    store: ResultStore
    base: str

    def url(self, image: ReleasedImage) -> str:
        return self.base + self.store.put(image.data, image.media_type)


def links(services: Services, request: Request) -> Links:
    base = services.settings.public_base_url or str(request.base_url)
    return Links(services.results, base.rstrip("/"))


def usage(req: GenerationRequest) -> Usage:
    text = InputTokens(text_tokens=req.prompt_tokens, image_tokens=req.input_images * req.image_tokens)
    out = OutputTokens(image_tokens=req.n * req.image_tokens)
    total_in = text.text_tokens + text.image_tokens
    return Usage(
        input_tokens=total_in,
        input_tokens_details=text,
        output_tokens=out.image_tokens,
        output_tokens_details=out,
        total_tokens=total_in + out.image_tokens,
    )


async def images_response(req: GenerationRequest, result: GenerationResult, links: Links) -> ImagesResponse:
    """Pixels leave only as ReleasedImage (made by the gate alone); held images become a review id."""

    # base64 of a few hundred kB is cheap, but keep it off the event loop like everything else.
    def encode() -> list[ImageOut]:
        return [
            (ImageOut.from_released(i, url=links.url(i)) if req.output.url else ImageOut.from_released(i))
            if isinstance(i, ReleasedImage)
            else ImageOut.from_held(i)
            for i in result.images
        ]

    return ImagesResponse(
        created=int(time.time()),
        data=await asyncio.to_thread(encode),
        output_format=req.output.format,
        size=f"{req.width}x{req.height}",
        quality=req.quality,
        usage=usage(req),
    )


def job_progress(job: Job, engine: Engine) -> dict[str, Any]:
    total = job.total_steps
    done = min(job.steps_done, total)
    worker = engine.workers.get(job.request.model)
    position = worker.queue_position(job) if worker is not None and job.state == "queued" else 0
    return {
        "status": job.state,
        "step": done,
        "total_steps": total,
        "fraction": round(done / total, 4) if total else 0.0,
        "queue_position": position,
    }


async def job_body(job: Job, engine: Engine, links: Links) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": job.id,
        "object": "image.generation.job",
        "created": job.created,
        "model": job.request.model,
        "n": job.request.n,
        **job_progress(job, engine),
    }
    if job.state == "succeeded":
        response = await images_response(job.request, job.future.result(), links)
        body["result"] = response.model_dump()
    elif job.state in ("failed", "cancelled"):
        body["error"] = {"code": job.error or job.state, "message": f"the job ended: {job.error or job.state}"}
    return body
