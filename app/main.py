"""create_app(): the FastAPI application. Nothing heavy happens at import time.

Models load in a background thread started by the lifespan, so the process answers /healthz at once
and /readyz turns true only when every loaded model has run its warm-up step.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import torch
from fastapi import FastAPI

from app import __version__
from app.api import (
    routes_health,
    routes_images,
    routes_jobs,
    routes_models,
    routes_review_page,
    routes_reviews,
    routes_verify,
)
from app.api.deps import Services
from app.api.errors import install_error_handlers
from app.api.observe import ObserveRequests
from app.engine.engine import Engine, EngineConfig, EngineObserver
from app.engine.jobs import JobStore
from app.engine.scheduler import SchedulerConfig
from app.gate.c2pa_manifest import ManifestSigner, SigningIdentity
from app.gate.policy import Policy
from app.gate.review import ReviewStore
from app.metrics import Metrics
from app.pipeline.loading import load_all, resolve_device, resolve_dtype
from app.pipeline.prompts import PromptCache
from app.settings import Settings

log = logging.getLogger(__name__)


def make_signer(settings: Settings) -> tuple[ManifestSigner, list[str]]:
    """The C2PA signer from settings, or a development chain generated in the state folder."""
    notes = []
    if settings.c2pa_cert_chain and settings.c2pa_private_key:
        identity = SigningIdentity.from_files(settings.c2pa_cert_chain, settings.c2pa_private_key)
    else:
        identity = SigningIdentity.development_chain(settings.state_dir / "c2pa")
        notes.append("C2PA signer is a generated development chain: signatures are valid but untrusted")
    if settings.c2pa_tsa_url:
        try:
            httpx.head(settings.c2pa_tsa_url, timeout=3.0)
        except httpx.HTTPError as exc:
            notes.append(f"C2PA time-stamp authority {settings.c2pa_tsa_url} is unreachable: {exc}")
    for note in notes:
        log.warning(note)
    return ManifestSigner(identity, settings.c2pa_tsa_url), notes


def load_and_start(services: Services) -> None:
    settings = services.settings
    try:
        services.signer, services.signer_notes = make_signer(settings)
        services.reviews = ReviewStore(settings.review_database())
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        models, failures = load_all(settings.models_dir, device, dtype)
    except Exception:
        log.exception("model loading failed")
        return
    services.models = {m.name: m for m in models}
    services.failures = failures
    if not models:
        log.error("no model could be loaded from %s", settings.models_dir)
        return
    config = EngineConfig(
        scheduler=SchedulerConfig(
            max_rows_per_forward=settings.max_rows_per_forward,
            max_queued_images=settings.max_queued_images,
            buckets=settings.buckets(),
            policy=settings.scheduling_policy,
        ),
        deadline_seconds=settings.request_deadline_seconds,
    )
    observer = EngineObserver(on_step=services.metrics.observe_step, on_job=services.metrics.observe_job)
    engine = Engine(models, config, services.cache, observer, services.signer, services.reviews)
    engine.start()
    services.engine = engine


def live_values(services: Services) -> dict[str, dict[str, tuple[float, ...]]]:
    engine = services.engine
    load = {name: tuple(float(v) for v in w.load()) for name, w in engine.workers.items()} if engine else {}
    return {"load": load, "cache": {"": (float(services.cache.hits), float(services.cache.misses))}}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    services = Services(
        settings=settings,
        metrics=Metrics(),
        cache=PromptCache(settings.prompt_cache_entries),
        jobs=JobStore(settings.max_jobs, settings.job_ttl_seconds),
        policy=Policy.load(settings.gate_policy) if settings.gate_policy else Policy.load(),
    )
    services.metrics.watch(lambda: live_values(services))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        loader = threading.Thread(target=load_and_start, args=(services,), name="model-loader", daemon=True)
        loader.start()
        yield
        loader.join()
        if services.engine is not None:
            services.engine.stop(timeout=30)

    app = FastAPI(title="imagegen", version=__version__, lifespan=lifespan)
    app.state.services = services
    install_error_handlers(app)
    routers = (
        routes_images,
        routes_jobs,
        routes_models,
        routes_reviews,
        routes_review_page,
        routes_verify,
        routes_health,
    )
    for module in routers:
        app.include_router(module.router)

    app.add_middleware(ObserveRequests, metrics=services.metrics)
    return app
