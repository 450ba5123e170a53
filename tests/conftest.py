"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Imported here: the GPU machine that runs the CuPy tests has no `gguf`.
    from llamafleet.demo_model import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("models") / "demo.gguf")
