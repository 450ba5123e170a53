"""Postproc settings (`LLAMAFLEET_POSTPROC_*`)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from llamafleet.config import ServiceSettings, env_prefix
from llamafleet.defaults import POSTPROC_METRICS_PORT, POSTPROC_PORT


class PostprocSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix=env_prefix("postproc"), extra="ignore")

    port: int = POSTPROC_PORT
    metrics_port: int = POSTPROC_METRICS_PORT
    # "auto" takes CuPy when a CUDA device works, else NumPy; "cupy" or "numpy" forces one.
    backend: str = Field(default="auto", pattern="auto|cupy|numpy")
    confidence_threshold: float = Field(default=0.5, gt=0, le=1)
    max_responses: int = Field(default=1024, ge=1)
    max_tokens_per_batch: int = Field(default=1_000_000, ge=1)
    # Sample: 8 CTAs of 32768 logits each hold one row, hence the vocabulary ceiling.
    max_vocab: int = Field(default=262_144, ge=1, le=262_144)
    max_batch_rows: int = Field(default=256, ge=1)
    max_history: int = Field(default=4096, ge=0)
    max_top_logprobs: int = Field(default=20, ge=0, le=32)
    # Micro-batching of concurrent calls: at most this many per batch, and the first waits
    # at most this long for others (0 batches only what is already queued).
    max_batch_requests: int = Field(default=64, ge=1)
    max_batch_wait_seconds: float = Field(default=0.002, ge=0, le=1)
    # Corpora may take this share of the device memory, or this many bytes of host memory on NumPy.
    corpus_memory_fraction: float = Field(default=0.5, gt=0, le=0.9)
    host_corpus_bytes: int = Field(default=1 << 30, ge=0)
    # Callers' shared-memory regions (RegisterSharedMemory) may map, and page-lock, this much together.
    shared_memory_bytes: int = Field(default=4 << 30, ge=0)
