"""Gateway settings (`LLAMAFLEET_GATEWAY_*`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from llamafleet.config import ServiceSettings, env_prefix
from llamafleet.defaults import (
    GATEWAY_HTTP_PORT,
    GATEWAY_METRICS_PORT,
    GATEWAY_PORT,
    POSTPROC_PORT,
    SCHEDULER_PORT,
    STORAGE_PORT,
)


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix=env_prefix("gateway"), extra="ignore")

    port: int = GATEWAY_PORT
    metrics_port: int = GATEWAY_METRICS_PORT
    # The OpenAI-compatible HTTP face on the same host; 0 turns it off.
    http_port: int = Field(default=GATEWAY_HTTP_PORT, ge=0, le=65535)
    scheduler_address: str = f"127.0.0.1:{SCHEDULER_PORT}"
    storage_address: str = f"127.0.0.1:{STORAGE_PORT}"
    postproc_address: str = f"127.0.0.1:{POSTPROC_PORT}"
    # Top-n logprobs requested from llama-server when a caller asks for token statistics.
    stats_n_probs: int = Field(default=5, ge=1, le=32)
    # How long a generation waits for a scheduler that is unavailable (restarting, or its pool
    # starting) before UNAVAILABLE; streams that had started resume after their tokens.
    scheduler_retry_s: float = Field(default=30.0, ge=0)
    # How long a resolved model name is trusted before storage is asked again.
    model_cache_s: float = Field(default=5.0, ge=0)

    # API keys (see `llamafleet keys`); unset means no authentication (the local demo).
    api_keys_file: Path | None = None
    # Generation streams open at once, both faces together; beyond it RESOURCE_EXHAUSTED.
    max_streams: int = Field(default=512, ge=1)
    # Per-key defaults for keys that set none (and for everyone when auth is off); 0 = unlimited.
    requests_per_min: float = Field(default=0.0, ge=0)
    tokens_per_min: float = Field(default=0.0, ge=0)
    # A key that asked this recently keeps its fair share of the streams reserved.
    fair_share_window_s: float = Field(default=10.0, gt=0)
    # retry-after sent when the streams, not a key's rate, are the limit.
    busy_retry_after_s: float = Field(default=1.0, gt=0)

    # TLS for the public ports (gRPC and HTTP): PEM files, both or neither.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    @model_validator(mode="after")
    def _tls_pair(self) -> GatewaySettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("set both tls_cert_file and tls_key_file, or neither")
        return self
