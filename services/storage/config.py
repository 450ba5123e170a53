"""Storage settings (`LLAMAFLEET_STORAGE_*`)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from llamafleet.config import ServiceSettings, env_prefix
from llamafleet.defaults import STORAGE_METRICS_PORT, STORAGE_PORT


class StorageSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix=env_prefix("storage"), extra="ignore")

    port: int = STORAGE_PORT
    metrics_port: int = STORAGE_METRICS_PORT
    filer_url: str = "http://127.0.0.1:8888"
    # The filer's gRPC port, where uploads create their entries; 0: weed's default, its HTTP
    # port + 10000.
    filer_grpc_port: int = Field(default=0, ge=0, le=65535)
    # The SeaweedFS master, to find the volume servers that blobs are read from directly;
    # empty: blobs are read through the filer.
    master_url: str = ""
    # Bytes per GetBlob message and per ranged read; reads in flight at once per GetBlob.
    chunk_bytes: int = Field(default=4 * 1024 * 1024, ge=4096, le=8 * 1024 * 1024)
    read_parallel: int = Field(default=4, ge=1, le=32)
    # Bytes per chunk an upload stores on a volume server; chunk uploads in flight at once per PutBlob.
    write_chunk_bytes: int = Field(default=8 * 1024 * 1024, ge=64 * 1024, le=64 * 1024 * 1024)
    write_parallel: int = Field(default=4, ge=1, le=32)
    # Seconds for one filer call (a whole streamed transfer is bounded by the caller's deadline).
    filer_timeout_s: float = Field(default=30.0, gt=0)
