"""Default ports of the local stack (all on 127.0.0.1) and the model it serves.

Plain constants, apart from `llamafleet.config`: the CLI reads them at every start and must
not pay for pydantic-settings there."""

from __future__ import annotations

GATEWAY_PORT = 50051
# The gateway's OpenAI-compatible HTTP face.
GATEWAY_HTTP_PORT = 8000
SCHEDULER_PORT = 50052
STORAGE_PORT = 50053
POSTPROC_PORT = 50054
GATEWAY_METRICS_PORT = 9101
SCHEDULER_METRICS_PORT = 9102
STORAGE_METRICS_PORT = 9103
POSTPROC_METRICS_PORT = 9104

DEFAULT_MODEL = "demo:latest"
