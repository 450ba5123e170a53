"""Storage settings (`LLAMAFLEET_STORAGE_*`)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from llamafleet.config import STORAGE_METRICS_PORT, STORAGE_PORT, ServiceSettings, env_prefix


class StorageSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix=env_prefix("storage"), extra="ignore")

    port: int = STORAGE_PORT
    metrics_port: int = STORAGE_METRICS_PORT
    filer_url: str = "http://127.0.0.1:8888"
    # Bytes per GetBlob message.
    chunk_bytes: int = Field(default=1024 * 1024, ge=4096, le=8 * 1024 * 1024)
    # Seconds for one filer call (a whole streamed transfer is bounded by the caller's deadline).
    filer_timeout_s: float = Field(default=30.0, gt=0)
