"""Probes and metrics: /healthz (alive), /readyz (loaded and warm), /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import ServicesDep

router = APIRouter()  # probes: always open
metrics_router = APIRouter()  # on the API port, or alone on IMAGEGEN_METRICS_PORT


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(services: ServicesDep) -> JSONResponse:
    engine = services.engine
    models = {
        name: ("ready" if engine is not None and engine.workers[name].ready.is_set() else "warming_up")
        for name in services.models
    }
    ready = engine is not None and engine.ready and not services.draining
    body = {
        "ready": ready,
        "draining": services.draining,
        "models": models,
        "failed_models": {f.name: f.error for f in services.failures},
        "signer": None
        if (signer := services.gate.signer) is None
        else {
            "subject": signer.identity.subject,
            "trusted": not signer.identity.development,
            "notes": services.signer_notes,
        },
    }
    return JSONResponse(body, status_code=200 if ready else 503)


@metrics_router.get("/metrics")
async def metrics(services: ServicesDep) -> Response:
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)
