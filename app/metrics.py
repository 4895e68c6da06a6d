"""Every Prometheus object of the service lives here; the rest of the code hands it plain data."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.engine.engine import JobStats, StepStats

LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
ROW_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)


class _Live(Collector):
    """Values read at scrape time (queue depth, prompt cache counters) instead of pushed."""

    def __init__(self, read: Callable[[], dict[str, dict[str, tuple[float, ...]]]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        snapshot = self.read()
        queued = GaugeMetricFamily("imagegen_queue_images", "Images accepted and waiting to start.", labels=["model"])
        running = GaugeMetricFamily("imagegen_running_rows", "Images in the denoising loop.", labels=["model"])
        for model, (q, r) in snapshot.get("load", {}).items():
            queued.add_metric([model], q)
            running.add_metric([model], r)
        hits = CounterMetricFamily("imagegen_prompt_cache_hits", "Prompt-embedding cache hits.")
        misses = CounterMetricFamily("imagegen_prompt_cache_misses", "Prompt-embedding cache misses.")
        cache = snapshot.get("cache", {}).get("", (0.0, 0.0))
        hits.add_metric([], cache[0])
        misses.add_metric([], cache[1])
        yield from (queued, running, hits, misses)


class Metrics:
    """One registry per app instance, so tests and several apps in one process do not collide."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "imagegen_http_requests_total",
            "HTTP requests by route and status.",
            ["route", "method", "status"],
            registry=r,
        )
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
            "imagegen_queue_wait_seconds",
            "Submit → first denoising step.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.job_seconds = Histogram(
            "imagegen_generation_duration_seconds", "Submit → images released.", ["model"], buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.jobs = Counter("imagegen_jobs_total", "Generation jobs by outcome.", ["model", "outcome"], registry=r)
        self.images = Counter("imagegen_images_total", "Images released.", ["model", "sampler"], registry=r)
        self.ready = Gauge("imagegen_ready", "1 when every model is loaded and warm.", registry=r)

    def watch(self, read: Callable[[], dict[str, dict[str, tuple[float, ...]]]]) -> None:
        self.registry.register(_Live(read))

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.request_seconds.labels(route, method).observe(seconds)

    def observe_step(self, s: StepStats) -> None:
        self.step_seconds.labels(s.model).observe(s.seconds)
        self.rows_per_forward.labels(s.model).observe(s.unet_rows)
        self.unet_rows.labels(s.model, "cond").inc(s.rows)
        if s.uncond_rows:
            self.unet_rows.labels(s.model, "uncond").inc(s.uncond_rows)
        if s.padded_rows:
            self.unet_rows.labels(s.model, "padding").inc(s.padded_rows)

    def observe_job(self, j: JobStats) -> None:
        self.jobs.labels(j.model, j.outcome).inc()
        if j.queue_seconds is not None:
            self.queue_wait.labels(j.model).observe(j.queue_seconds)
        if j.outcome == "succeeded":
            self.job_seconds.labels(j.model).observe(j.total_seconds)
            self.images.labels(j.model, j.sampler).inc(j.images)
