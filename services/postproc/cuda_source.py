"""The postproc CUDA sources: ``kernels/*.cu`` beside this module, with the Python side's
constants prepended as macros, so a size or a shared definition is written once."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

__all__ = ["KERNEL_DIR", "cuda_source"]

KERNEL_DIR = Path(__file__).with_name("kernels")


def cuda_source(name: str, defines: Mapping[str, object] | None = None) -> str:
    """The text of ``kernels/<name>`` after one ``#define`` per entry of ``defines``."""
    prelude = "".join(f"#define {key} {value}\n" for key, value in (defines or {}).items())
    return prelude + (KERNEL_DIR / name).read_text()
