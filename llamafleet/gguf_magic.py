"""The 4 bytes every GGUF file starts with, checked without loading the `gguf` package (and
NumPy with it): `llamafleet models push` refuses a file that is no model before hashing it,
at the cost of a 4-byte read and no import."""

from __future__ import annotations

# gguf.constants.GGUF_MAGIC as the file stores it (little-endian u32).
MAGIC = b"GGUF"


def magic_problem(prefix: bytes | bytearray) -> str | None:
    """Why a stream starting with `prefix` is not a GGUF file; None while it may be one
    (fewer than 4 bytes known, or the magic is there)."""
    if len(prefix) >= len(MAGIC) and prefix[: len(MAGIC)] != MAGIC:
        return f"it starts with {bytes(prefix[: len(MAGIC)])!r}, not the GGUF magic {MAGIC!r}"
    return None
