"""Settings shared by every service, read from `LLAMAFLEET_<SERVICE>_*` environment variables
(their default ports: `llamafleet.defaults`)."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict


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
