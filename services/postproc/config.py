"""Postproc settings (`LLAMAFLEET_POSTPROC_*`)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from llamafleet.config import POSTPROC_METRICS_PORT, POSTPROC_PORT, ServiceSettings, env_prefix


class PostprocSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix=env_prefix("postproc"), extra="ignore")

    port: int = POSTPROC_PORT
    metrics_port: int = POSTPROC_METRICS_PORT
    # "auto" takes CuPy when a CUDA device works, else NumPy; "cupy" or "numpy" forces one.
    backend: str = Field(default="auto", pattern="auto|cupy|numpy")
    confidence_threshold: float = Field(default=0.5, gt=0, le=1)
    max_responses: int = Field(default=1024, ge=1)
    max_tokens_per_batch: int = Field(default=1_000_000, ge=1)
