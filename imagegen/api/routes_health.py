"""Probes and metrics: /healthz (alive), /readyz (loaded, warm, database reachable), /metrics (Prometheus)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from imagegen.api.deps import Services, ServicesDep

router = APIRouter()  # probes: always open
metrics_router = APIRouter()  # on the API port, or alone on IMAGEGEN_METRICS_PORT


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def database_status(services: Services) -> dict[str, Any] | None:
    """The review and audit database: every release writes to it, so a replica that cannot reach it is not
    ready. The ping runs off the event loop; the store shares one ping among probes within a second."""
    store = services.gate.reviews
    if store is None:  # start-up has not opened it yet
        return None
    return {"kind": store.kind, "reachable": await asyncio.to_thread(store.reachable)}


@router.get("/readyz")
async def readyz(services: ServicesDep) -> JSONResponse:
    engine = services.engine
    database = await database_status(services)
    models = {
        name: ("ready" if engine is not None and engine.workers[name].ready.is_set() else "warming_up")
        for name in services.models
    }
    ready = engine is not None and engine.ready and not services.draining
    ready = ready and database is not None and database["reachable"]
    body = {
        "ready": ready,
        "draining": services.draining,
        "models": models,
        "failed_models": {f.name: f.error for f in services.failures},
        "database": database,
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
