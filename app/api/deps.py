"""Typed FastAPI dependencies: what a route needs, taken from the app's state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from app.api.keys import KeyRing
from app.api.quotas import Quotas
from app.engine.engine import Engine
from app.engine.jobs import JobStore
from app.gate.gate import Gate
from app.metrics import Metrics
from app.pipeline.loading import LoadedModel, LoadFailure
from app.pipeline.prompts import PromptCache
from app.settings import Settings


@dataclass
class Services:
    """Everything the app holds between requests; built in the lifespan, read by routes."""

    settings: Settings
    metrics: Metrics
    cache: PromptCache
    jobs: JobStore
    gate: Gate
    keys: KeyRing | None = None
    quotas: Quotas = field(default_factory=Quotas)
    draining: bool = False
    engine: Engine | None = None
    signer_notes: list[str] = field(default_factory=list)
    models: dict[str, LoadedModel] = field(default_factory=dict)
    failures: list[LoadFailure] = field(default_factory=list)


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]
