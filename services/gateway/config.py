"""Gateway settings (`LLAMAFLEET_GATEWAY_*`)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from llamafleet.config import (
    DEFAULT_MODEL,
    GATEWAY_METRICS_PORT,
    GATEWAY_PORT,
    POSTPROC_PORT,
    SCHEDULER_PORT,
    STORAGE_PORT,
    ServiceSettings,
    env_prefix,
)


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix=env_prefix("gateway"), extra="ignore")

    port: int = GATEWAY_PORT
    metrics_port: int = GATEWAY_METRICS_PORT
    scheduler_address: str = f"127.0.0.1:{SCHEDULER_PORT}"
    storage_address: str = f"127.0.0.1:{STORAGE_PORT}"
    postproc_address: str = f"127.0.0.1:{POSTPROC_PORT}"
    # The model of a request that names none.
    default_model: str = DEFAULT_MODEL
    # Top-n logprobs requested from llama-server when a caller asks for token statistics.
    stats_n_probs: int = Field(default=5, ge=1, le=32)
    # How long a resolved model name is trusted before storage is asked again.
    model_cache_s: float = Field(default=5.0, ge=0)
    max_tokens: int = Field(default=4096, ge=1)
    default_max_tokens: int = Field(default=128, ge=1)
