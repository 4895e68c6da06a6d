"""create_app(): the FastAPI application. Nothing heavy happens at import time.

Models load in a background thread started by the lifespan, so the process answers /healthz at once
and /readyz turns true only when every loaded model has run its warm-up step.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import torch
from fastapi import FastAPI

from imagegen import __version__
from imagegen.api import (
    routes_edits,
    routes_files,
    routes_health,
    routes_images,
    routes_jobs,
    routes_models,
    routes_review_page,
    routes_reviews,
    routes_sdapi,
    routes_verify,
)
from imagegen.api.deps import Services, StreamSlots
from imagegen.api.errors import install_error_handlers
from imagegen.api.job_sharing import share_jobs
from imagegen.api.keys import KeyRing
from imagegen.api.limits import LimitBodySize
from imagegen.api.observe import ObserveRequests
from imagegen.engine.engine import Engine, EngineConfig, EngineObserver
from imagegen.engine.jobs import JobStore
from imagegen.engine.scheduler import SchedulerConfig
from imagegen.gate.c2pa_manifest import ManifestSigner, SigningIdentity
from imagegen.gate.gate import Gate
from imagegen.gate.policy import Policy
from imagegen.metrics import Metrics, ModelLoad, Snapshot
from imagegen.pipeline.loading import load_all, resolve_placement
from imagegen.pipeline.prompts import PromptCache
from imagegen.settings import Settings
from imagegen.state.quotas import SharedQuotas
from imagegen.state.results import ResultStore, signing_key
from imagegen.state.reviews import ReviewStore
from imagegen.state.shared_jobs import SharedJobs
from imagegen.state.shared_results import SharedResultStore

log = logging.getLogger(__name__)


def make_signer(settings: Settings, on_sign: Callable[[float], None] | None = None) -> tuple[ManifestSigner, list[str]]:
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
    return ManifestSigner(identity, settings.c2pa_tsa_url, on_sign), notes


def load_and_start(services: Services) -> None:
    """Load the models, then run the engine's step loop in this same thread: torch work on more than one thread
    starts more than one OpenMP team on a CPU, and the teams slow each other's forwards down (about 2× here)."""
    settings = services.settings
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)  # per thread with OpenMP: here, where the forwards run
    try:
        services.gate.signer, services.signer_notes = make_signer(settings, services.metrics.sign_seconds.observe)
        # Builds without PostgreSQL up: its schema is made on the first connection that works.
        services.gate.reviews = ReviewStore(
            settings.review_database(),
            connect_timeout=settings.database_connect_timeout_seconds,
            statement_timeout=settings.database_statement_timeout_seconds,
            pool_size=settings.database_pool_size,
        )
        placement = resolve_placement(
            settings.device, settings.dtype, settings.text_encoder_device, settings.decode_dtype
        )
        models, failures = load_all(settings.models_dir, placement)
    except Exception:
        log.exception("model loading failed")
        return
    services.models = {m.name: m for m in models}
    services.failures = failures
    if services.draining:  # told to stop while loading: do not start what would only be stopped
        return
    if not models:
        log.error("no model could be loaded from %s", settings.models_dir)
        return
    config = EngineConfig(
        scheduler=SchedulerConfig(
            max_rows_per_forward=settings.max_rows_per_forward,
            max_queued_images=settings.max_queued_images,
            max_queue_seconds=settings.max_queue_seconds,
            buckets=settings.buckets(),
            policy=settings.scheduling_policy,
        ),
        deadline_seconds=settings.request_deadline_seconds,
        max_release_backlog_bytes=settings.max_release_backlog_bytes,
    )
    if settings.compile != "off":
        for model in models:
            model.family.compile(settings.compile)
    m = services.metrics
    observer = EngineObserver(
        on_step=m.observe_step, on_job=m.observe_job, on_decode=m.observe_decode, on_non_finite=m.observe_non_finite
    )
    engine = Engine(models, config, services.cache, services.gate.finish, observer, services.gate.partial)
    services.engine = engine
    engine.start(here=True)  # returns when the engine stops


def snapshot(services: Services) -> Snapshot:
    engine = services.engine
    capacity = services.settings.max_queued_images
    models = {}
    for name, model in services.models.items():
        images, requests, running = engine.workers[name].load() if engine else (0, 0, 0)
        models[name] = ModelLoad(images, requests, running, capacity, model.load_seconds)
    memory = {}
    for device in {m.device for m in services.models.values() if m.device.type == "cuda"}:
        memory[(str(device), "allocated")] = torch.cuda.memory_allocated(device)
        memory[(str(device), "reserved")] = torch.cuda.memory_reserved(device)
    signer = services.gate.signer
    reviews = services.gate.reviews
    database_up = None if reviews is None else reviews.last_reachable  # the last probe's: no query at scrape
    return Snapshot(
        models=models,
        cache_hits=services.cache.hits,
        cache_misses=services.cache.misses,
        ready=engine is not None and engine.ready and not services.draining and database_up is not False,
        draining=services.draining,
        signer_trusted=None if signer is None else not signer.identity.development,
        device_memory=memory,
        database_up=database_up,
    )


def results_store(settings: Settings) -> ResultStore:
    """Result URLs in the shared database when replicas share PostgreSQL (any replica serves any link), else in
    the state folder."""
    url = settings.database_url
    if url and url.startswith(("postgresql://", "postgres://")):
        return SharedResultStore(
            url,
            settings.result_url_ttl_seconds,
            settings.max_result_url_bytes,
            settings.database_connect_timeout_seconds,
        )
    folder = settings.state_dir
    return ResultStore(
        folder / "results", signing_key(folder), settings.result_url_ttl_seconds, settings.max_result_url_bytes
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    policy = Policy.load(settings.gate_policy) if settings.gate_policy else Policy.load()
    services = Services(
        settings=settings,
        metrics=metrics,
        cache=PromptCache(settings.prompt_cache_entries),
        jobs=JobStore(settings.max_jobs, settings.job_ttl_seconds, settings.max_job_result_bytes),
        streams=StreamSlots(settings.max_streams, settings.max_streams_per_job),
        gate=Gate(policy, on_decision=metrics.observe_gate_decision),
        results=results_store(settings),
    )
    if settings.database_url and settings.database_url.startswith(("postgresql://", "postgres://")):
        services.shared_jobs = SharedJobs(
            settings.database_url,
            f"{socket.gethostname()}-{os.getpid()}",
            settings.database_connect_timeout_seconds,
            settings.database_statement_timeout_seconds,
            settings.job_lease_seconds,
        )
        # Key quotas count across the replicas; per replica again while the database is unreachable.
        services.quotas = SharedQuotas(
            settings.database_url, f"{socket.gethostname()}-{os.getpid()}", settings.job_lease_seconds
        )
    if settings.api_keys_file is not None:
        services.keys = KeyRing.load(settings.api_keys_file)  # a bad key file stops the start, loudly
    services.metrics.watch(lambda: snapshot(services))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=load_and_start, args=(services,), name="engine", daemon=True)
        loader.start()
        sharing = asyncio.create_task(share_jobs(services)) if services.shared_jobs is not None else None
        yield
        if sharing is not None:
            sharing.cancel()
        # Off the event loop, so the ops port keeps answering; a load still running is abandoned (daemon).
        if services.engine is not None:
            await asyncio.to_thread(services.engine.stop, 30)
        await asyncio.to_thread(loader.join, 5)
        for store in (services.shared_jobs, services.quotas, services.results):
            close = getattr(store, "close", None)
            if close is not None:
                await asyncio.to_thread(close)

    closed = services.keys is not None  # with keys, nothing but probes and metrics answers without one
    app = FastAPI(
        title="imagegen",
        version=__version__,
        lifespan=lifespan,
        docs_url=None if closed else "/docs",
        redoc_url=None if closed else "/redoc",
        openapi_url=None if closed else "/openapi.json",
    )
    app.state.services = services
    install_error_handlers(app)
    routers = (
        routes_images,
        routes_edits,
        routes_sdapi,
        routes_jobs,
        routes_files,
        routes_models,
        routes_reviews,
        routes_review_page,
        routes_verify,
        routes_health,
    )
    for module in routers:
        app.include_router(module.router)
    if settings.metrics_port is None:
        app.include_router(routes_health.metrics_router)

    # Added last runs first: requests are observed (metrics, access log), then their bodies bounded.
    app.add_middleware(LimitBodySize, json_bytes=settings.max_json_body_bytes, upload_bytes=settings.max_upload_bytes)
    app.add_middleware(ObserveRequests, metrics=services.metrics)
    return app


def create_ops_app(services: Services) -> FastAPI:
    """Probes and /metrics for IMAGEGEN_METRICS_PORT: the same services, no API routes, no lifespan."""
    app = FastAPI(title="imagegen ops", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.services = services
    app.include_router(routes_health.router)
    app.include_router(routes_health.metrics_router)
    return app
