"""Shared fixtures: the demo model, and helpers that bound every wait."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamafleet.demo_model import write_demo_model


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("models") / "demo.gguf")
