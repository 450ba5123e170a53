"""Which stored blobs the gateway lists as models (ListModels, GET /v1/models). No server needed."""

from __future__ import annotations

from llamafleet.v1 import storage_pb2
from services.gateway.models import is_model

MODEL = storage_pb2.ARTIFACT_KIND_MODEL


def test_only_gguf_models_are_listed() -> None:
    assert is_model(storage_pb2.BlobInfo(kind=MODEL, metadata={"gguf_version": "3", "architecture": "llama"}))
    # Pushed as a model before storage checked GGUF headers: any bytes, never loadable.
    assert not is_model(storage_pb2.BlobInfo(kind=MODEL))
    assert not is_model(storage_pb2.BlobInfo(kind=storage_pb2.ARTIFACT_KIND_PROMPTS, metadata={"gguf_version": "3"}))
    assert not is_model(storage_pb2.BlobInfo(kind=storage_pb2.ARTIFACT_KIND_OTHER))
