"""Every Prometheus object of the service lives here; the rest of the code hands it plain data."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from imagegen.engine.engine import DecodeStats, JobStats, NonFiniteStats, StepStats

LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
ROW_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)
GATE_OUTCOMES = {"release": "release", "hold": "human_review", "block": "blocked"}  # gate verdict → label
PER_MODEL_GAUGES = {  # ModelLoad attribute → (metric, help)
    "queued_images": ("imagegen_queue_images", "Images accepted, not yet running."),
    "queued_requests": ("imagegen_queue_requests", "Requests waiting to start."),
    "running_rows": ("imagegen_running_rows", "Images in the denoising loop."),
    "capacity_images": ("imagegen_queue_capacity_images", "Queue bound: more waiting images get 429."),
    "load_seconds": ("imagegen_model_load_seconds", "Time the model took to load."),
}


@dataclass(frozen=True)
class ModelLoad:
    queued_images: int
    queued_requests: int
    running_rows: int
    capacity_images: int
    load_seconds: float


@dataclass(frozen=True)
class Snapshot:
    """What is read at scrape time rather than pushed."""

    models: dict[str, ModelLoad] = field(default_factory=dict)
    cache_hits: int = 0
    cache_misses: int = 0
    ready: bool = False
    draining: bool = False
    signer_trusted: bool | None = None  # None until the signer exists
    device_memory: dict[tuple[str, str], int] = field(default_factory=dict)  # (device, kind) → bytes
    database_up: bool | None = None  # None until the review store has reached (or missed) its database


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class _Live(Collector):
    def __init__(self, read: Callable[[], Snapshot]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        s = self.read()
        per_model = {
            attr: GaugeMetricFamily(name, doc, labels=["model"]) for attr, (name, doc) in PER_MODEL_GAUGES.items()
        }
        for model, load in s.models.items():
            for attr, family in per_model.items():
                family.add_metric([model], getattr(load, attr))
        yield from per_model.values()
        yield CounterMetricFamily("imagegen_prompt_cache_hits", "Prompt-embedding cache hits.", s.cache_hits)
        yield CounterMetricFamily(
            "imagegen_prompt_cache_misses", "Prompt-embedding cache misses.", value=s.cache_misses
        )
        yield _gauge(
            "imagegen_ready", "1 when the models are loaded and warm and the replica is not draining.", s.ready
        )
        yield _gauge("imagegen_draining", "1 while the replica finishes its work before exiting.", s.draining)
        if s.signer_trusted is not None:
            yield _gauge(
                "imagegen_c2pa_signer_trusted", "0 when C2PA signs with a development chain.", s.signer_trusted
            )
        if s.database_up is not None:
            doc = "1 when the review and audit database answered its last probe or statement."
            yield _gauge("imagegen_database_up", doc, s.database_up)
        memory = GaugeMetricFamily("imagegen_device_memory_bytes", "Accelerator memory.", labels=["device", "kind"])
        for (device, kind), value in s.device_memory.items():
            memory.add_metric([device, kind], value)
        yield memory


class Metrics:
    """One registry per app instance, so tests and several apps in one process do not collide."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(namespace="imagegen", registry=r)  # resident memory, CPU seconds, open fds
        self.requests = Counter(
            "imagegen_http_requests_total", "HTTP requests by route and status.", ["route", "method", "status"],
            registry=r,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "imagegen_http_request_duration_seconds", "HTTP request latency by route.", ["route", "method"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.step_seconds = Histogram(
            "imagegen_step_duration_seconds", "One denoising step (one UNet forward).", ["model"], buckets=STEP_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.rows_per_forward = Histogram(
            "imagegen_rows_per_forward", "UNet rows per forward (batch occupancy).", ["model"], buckets=ROW_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.unet_rows = Counter(
            "imagegen_unet_evaluations_total", "UNet row evaluations by kind.", ["model", "kind"], registry=r
        )
        self.queue_wait = Histogram(
            "imagegen_queue_wait_seconds", "Submit → first denoising step starts.", ["model"], buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.first_step = Histogram(
            "imagegen_time_to_first_step_seconds", "Submit → first denoising step done.", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.decode_seconds = Histogram(
            "imagegen_vae_decode_seconds", "One batched VAE decode.", ["model"], buckets=STEP_BUCKETS, registry=r
        )
        self.job_seconds = Histogram(
            "imagegen_generation_duration_seconds", "Submit → images released.", ["model"], buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.sign_seconds = Histogram(
            "imagegen_c2pa_sign_seconds", "Signing one image's C2PA manifest.", buckets=STEP_BUCKETS, registry=r
        )
        self.jobs = Counter("imagegen_jobs_total", "Generation jobs by outcome.", ["model", "outcome"], registry=r)
        self.images = Counter(
            "imagegen_images_total",
            "Images generated (released, or held for review).",
            ["model", "sampler"],
            registry=r,
        )
        self.non_finite = Counter(
            "imagegen_non_finite_images_total", "Images whose latent or pixels were not finite (never released).",
            ["model", "sampler"], registry=r,
        )  # fmt: skip
        self.gate_decisions = Counter(
            "imagegen_gate_decisions_total", "Release-policy decisions on requests.", ["outcome"], registry=r
        )
        self.quota_rejections = Counter(
            "imagegen_quota_rejections_total", "Generation requests refused by a key's quota.", ["key", "reason"],
            registry=r,
        )  # fmt: skip
        self.sync_lost = Counter(
            "imagegen_sync_requests_lost_total",
            "Synchronous requests whose replica died before answering (seen by a replica sharing the database).",
            registry=r,
        )

    def watch(self, read: Callable[[], Snapshot]) -> None:
        self.registry.register(_Live(read))

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.request_seconds.labels(route, method).observe(seconds)

    def observe_gate_decision(self, outcome: str) -> None:
        self.gate_decisions.labels(GATE_OUTCOMES.get(outcome, outcome)).inc()

    def observe_step(self, s: StepStats) -> None:
        self.step_seconds.labels(s.model).observe(s.seconds)
        self.rows_per_forward.labels(s.model).observe(s.unet_rows)
        self.unet_rows.labels(s.model, "cond").inc(s.rows)
        if s.uncond_rows:
            self.unet_rows.labels(s.model, "uncond").inc(s.uncond_rows)
        if s.padded_rows:
            self.unet_rows.labels(s.model, "padding").inc(s.padded_rows)

    def observe_non_finite(self, s: NonFiniteStats) -> None:
        self.non_finite.labels(s.model, s.sampler).inc(s.images)

    def observe_decode(self, d: DecodeStats) -> None:
        self.decode_seconds.labels(d.model).observe(d.seconds)

    def observe_job(self, j: JobStats) -> None:
        self.jobs.labels(j.model, j.outcome).inc()
        if j.queue_seconds is not None:
            self.queue_wait.labels(j.model).observe(j.queue_seconds)
        if j.first_step_seconds is not None:
            self.first_step.labels(j.model).observe(j.first_step_seconds)
        if j.outcome == "succeeded":
            self.job_seconds.labels(j.model).observe(j.total_seconds)
            self.images.labels(j.model, j.sampler).inc(j.images)
