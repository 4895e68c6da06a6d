"""Response bodies built from engine objects: released images and job status."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

from imagegen.api.schemas import ImageOut, ImagesResponse
from imagegen.engine.engine import Engine
from imagegen.engine.request import GenerationRequest, GenerationResult, Job
from imagegen.gate import ReleasedImage


async def images_response(req: GenerationRequest, result: GenerationResult) -> ImagesResponse:
    """Pixels leave only as ReleasedImage (made by the gate alone); held images become a review id."""

    # base64 of a few hundred kB is cheap, but keep it off the event loop like everything else.
    def encode() -> list[ImageOut]:
        return [
            ImageOut.from_released(i, base64.b64encode(i.data).decode())
            if isinstance(i, ReleasedImage)
            else ImageOut.from_held(i)
            for i in result.images
        ]

    return ImagesResponse(
        created=int(time.time()),
        data=await asyncio.to_thread(encode),
        output_format=req.output.format,
        size=f"{req.width}x{req.height}",
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


async def job_body(job: Job, engine: Engine) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": job.id,
        "object": "image.generation.job",
        "created": job.created,
        "model": job.request.model,
        "n": job.request.n,
        **job_progress(job, engine),
    }
    if job.state == "succeeded":
        response = await images_response(job.request, job.future.result())
        body["result"] = response.model_dump()
    elif job.state in ("failed", "cancelled"):
        body["error"] = {"code": job.error or job.state, "message": f"the job ended: {job.error or job.state}"}
    return body
