"""Service settings, from ``IMAGEGEN_*`` environment variables (or a .env file), validated once at start."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMAGEGEN_", env_file=".env", extra="ignore")

    host: str = Field("127.0.0.1", description="Interface to listen on (0.0.0.0 in a container).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    models_dir: Path = Field(REPO_ROOT / "models", description="Folder whose sub-folders are served as models.")
    default_model: str | None = Field(None, description="Model used when a request names none (default: first).")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Network dtype: auto = bf16/fp16 on CUDA, fp32 on CPU."
    )
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's choice).")
    max_prompt_chars: int = Field(2000, ge=1, description="Longest accepted prompt / negative prompt.")
    max_images: int = Field(10, ge=1, le=10, description="Largest n per request.")
    max_steps: int = Field(150, ge=1, description="Most denoising steps per request.")
    max_guidance_scale: float = Field(30.0, ge=0, description="Largest guidance_scale.")
    max_pixels: int = Field(1024 * 1024, ge=64 * 64, description="Largest width × height.")
    log_level: str = Field("info", description="Python log level.")
