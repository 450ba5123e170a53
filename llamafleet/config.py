"""Settings shared by every service, read from `LLAMAFLEET_<SERVICE>_*` environment variables."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict

# Default ports of the local stack, all on 127.0.0.1.
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


def env_prefix(service: str) -> str:
    """The environment prefix of one service's settings, e.g. `LLAMAFLEET_GATEWAY_`."""
    return f"LLAMAFLEET_{service.upper()}_"


class ServiceSettings(BaseSettings):
    """What every gRPC service needs: where to listen, where to export metrics, how to stop."""

    model_config = SettingsConfigDict(extra="ignore")

    host: str = "127.0.0.1"
    port: int
    metrics_host: str = "127.0.0.1"
    metrics_port: int
    # Seconds in-flight RPCs get to finish on SIGTERM before they are cancelled.
    grace_seconds: float = 5.0
    log_level: str = "INFO"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"
