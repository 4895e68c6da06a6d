"""Service settings, from ``IMAGEGEN_*`` environment variables (or a .env file), validated once at start."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMAGEGEN_", env_file=".env", extra="ignore")

    host: str = Field("127.0.0.1", description="Interface to listen on (0.0.0.0 in a container).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="Serve /metrics (and copies of the probes) here instead of on the API port."
    )
    drain_seconds: float = Field(60.0, ge=0, description="After SIGTERM: most time to finish accepted work, then exit.")
    models_dir: Path = Field(REPO_ROOT / "models", description="Folder whose sub-folders are served as models.")
    default_model: str | None = Field(None, description="Model used when a request names none (default: first).")
    model_aliases: str = Field(
        "", description="Other names for served models, for clients with hard-coded ones: gpt-image-1=catalog-128,…"
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    text_encoder_device: str = Field(
        "same", description="Where text encoders run: same (as the denoiser), cpu, cuda or cuda:N (T5-XXL is 4.7 B)."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Network dtype: auto = bf16/fp16 on CUDA, fp32 on CPU."
    )
    decode_dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="The VAE decoder's dtype: auto = the network dtype. bfloat16 on a CPU with native bf16 (AVX-512 "
        "BF16, AMX) decodes ~2.6× faster, changing pixels by 0.24/255 on average.",
    )
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's choice).")
    max_prompt_chars: int = Field(2000, ge=1, description="Longest accepted prompt / negative prompt.")
    max_images: int = Field(10, ge=1, le=10, description="Largest n per request.")
    max_steps: int = Field(150, ge=1, description="Most denoising steps per request.")
    max_guidance_scale: float = Field(30.0, ge=0, description="Largest guidance_scale.")
    max_pixels: int = Field(1024 * 1024, ge=64 * 64, description="Largest width × height.")
    max_area_factor: float = Field(
        4.0, gt=0, description="Largest width × height per model, as a multiple of its native (default) area."
    )
    max_json_body_bytes: int = Field(
        64 * 1024, ge=1024, description="Largest JSON (or form) request body; more → 413 before parsing or auth."
    )
    max_upload_bytes: int = Field(
        20 * 1024 * 1024, ge=1024, description="Largest image upload body (/v1/verify and the edit routes); more → 413."
    )
    max_upload_pixels: int = Field(
        4096 * 4096, ge=64 * 64, description="Largest width × height of an uploaded image, read from its header."
    )
    verify_workers: int = Field(2, ge=1, description="Threads that verify uploaded images (a pool of their own).")
    http_max_connections: int = Field(
        512, ge=1, description="Concurrent connections + tasks per process; more → 503 (uvicorn limit_concurrency)."
    )
    http_keepalive_seconds: int = Field(5, ge=1, description="Idle keep-alive connections close after this.")
    max_streams_per_job: int = Field(4, ge=1, description="Open SSE event streams per job.")
    max_streams: int = Field(128, ge=1, description="Open SSE event streams per process.")
    stream_keepalive_seconds: float = Field(15.0, gt=0, description="SSE comment sent when nothing else was.")
    job_lease_seconds: float = Field(
        5.0, gt=0, description="With PostgreSQL: a replica silent this long loses its async jobs to another replica."
    )
    forwarded_allow_ips: str = Field(
        "127.0.0.1", description="Proxies whose X-Forwarded-* headers are trusted (comma list, or * in a cluster)."
    )
    public_base_url: str | None = Field(
        None, description="Absolute base of result URLs (https://images.example.com); unset: the request's own."
    )
    result_url_ttl_seconds: float = Field(3600.0, gt=0, description="How long a response_format=url link works.")
    max_result_url_bytes: int = Field(
        1024 * 1024 * 1024, ge=1024 * 1024, description="Bytes of images kept for URLs (oldest dropped first)."
    )
    max_job_result_bytes: int = Field(
        256 * 1024 * 1024, ge=1024 * 1024, description="Bytes of finished async results kept (oldest dropped first)."
    )
    max_release_backlog_bytes: int = Field(
        512 * 1024 * 1024,
        ge=1024 * 1024,
        description="Decoded pixels waiting to be labelled and signed; past it the step loop waits.",
    )
    database_connect_timeout_seconds: float = Field(3.0, gt=0, description="Connecting to PostgreSQL.")
    database_statement_timeout_seconds: float = Field(10.0, gt=0, description="One PostgreSQL statement.")
    database_pool_size: int = Field(4, ge=1, description="PostgreSQL connections per process.")
    review_session_seconds: float = Field(8 * 3600.0, gt=0, description="A reviewer's page session lasts this.")
    cookie_secure: bool = Field(False, description="Mark the reviewer session cookie Secure (serving over TLS).")
    max_rows_per_forward: int = Field(16, ge=2, description="UNet rows per forward pass (uncond rows count).")
    max_queued_images: int = Field(64, ge=1, description="Images accepted but not yet running; more → 429.")
    max_queue_seconds: float | None = Field(
        30.0, gt=0, description="A request that would wait longer than this for the work ahead of it → 429."
    )
    scheduling_policy: Literal["short_first", "fifo"] = Field(
        "short_first",
        description="short_first: fewest remaining steps first, aged; fifo: every admitted row each step.",
    )
    batch_buckets: str = Field("", description='Pad forwards to fixed sizes, e.g. "1,2,4,8,16" (CUDA graphs).')
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = Field(
        "off", description="torch.compile each denoiser with this mode, compiled for every bucket before /readyz."
    )
    request_deadline_seconds: float | None = Field(300.0, gt=0, description="A request not done by then → 504.")
    prompt_cache_entries: int = Field(1024, ge=0, description="LRU entries of (model, prompt) → token states.")
    job_ttl_seconds: float = Field(600.0, gt=0, description="How long finished async jobs keep their result.")
    max_jobs: int = Field(256, ge=1, description="Async jobs kept at most (finished ones are dropped first).")
    gate_policy: Path | None = Field(
        None, description="Release policy file (default: imagegen/gate/default_policy.toml)."
    )
    database_url: str | None = Field(
        None, description="postgresql://… for held images and the audit log (default: SQLite in the state dir)."
    )
    api_keys_file: Path | None = Field(
        None, description="TOML file of hashed API keys with roles and quotas; unset: open generation, no review."
    )
    state_dir: Path = Field(REPO_ROOT / "var", description="Service state: the development signing chain.")
    c2pa_cert_chain: Path | None = Field(None, description="PEM chain (signing certificate first) for C2PA.")
    c2pa_private_key: Path | None = Field(None, description="PEM private key (ES256) for C2PA.")
    c2pa_tsa_url: str | None = Field(None, description="RFC 3161 time-stamp authority for C2PA signatures.")
    log_level: str = Field("info", description="Python log level.")
    log_format: Literal["json", "text"] = Field("json", description="json: one JSON object per line, with request ids.")

    @model_validator(mode="after")
    def _aliases_are_pairs(self) -> Settings:
        for pair in filter(str.strip, self.model_aliases.split(",")):
            alias, eq, name = pair.partition("=")
            if not (eq and alias.strip() and name.strip()):
                raise ValueError(f"IMAGEGEN_MODEL_ALIASES: {pair!r} is not alias=model")
        return self

    @model_validator(mode="after")
    def _ports_differ(self) -> Settings:
        if self.metrics_port == self.port:
            raise ValueError("IMAGEGEN_METRICS_PORT must differ from IMAGEGEN_PORT")
        return self

    def review_database(self) -> str:
        return self.database_url or f"sqlite:///{self.state_dir / 'reviews.sqlite3'}"

    def aliases(self) -> dict[str, str]:
        pairs = [p.partition("=") for p in self.model_aliases.split(",") if p.strip()]
        return {alias.strip(): name.strip() for alias, _, name in pairs}

    def buckets(self) -> tuple[int, ...]:
        return tuple(sorted(int(b) for b in self.batch_buckets.split(",") if b.strip()))
