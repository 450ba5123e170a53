"""A stand-in for the parts of CuPy a block-level kernel module uses, running the kernels on
the CPU through ``cuda_emu.h`` (compiled with the system C++ compiler), so their logic is
tested in CI without a GPU.  Arrays are NumPy arrays."""

from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
import tempfile
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.postproc.pdl import arg_bits

_HEADER = Path(__file__).with_name("cuda_emu.h")
_BUILD = Path(tempfile.gettempdir()) / "llamafleet-cuda-emu"


def _compile(source: str, kernels: Sequence[str]) -> ctypes.CDLL:
    exports = "".join(f"EMU_EXPORT({k})\n" for k in kernels)
    code = f'#include "{_HEADER}"\n{source}\n{exports}'
    tag = hashlib.sha256((code + _HEADER.read_text()).encode()).hexdigest()[:16]
    _BUILD.mkdir(exist_ok=True)
    lib = _BUILD / f"kernels-{tag}.so"
    if not lib.exists():
        cpp = lib.with_suffix(".cpp")
        cpp.write_text(code)
        partial = lib.with_suffix(".tmp")
        command = ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-o", str(partial), str(cpp)]
        built = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if built.returncode != 0:
            raise RuntimeError(f"the CUDA emulator build failed:\n{built.stderr[-4000:]}")
        partial.rename(lib)  # whole or absent, for concurrent test runs
    return ctypes.CDLL(str(lib))


def emulated_cupy(kernels: Sequence[str]) -> Any:
    """A ``cupy`` look-alike whose ``RawModule`` builds ``kernels`` for the emulator."""
    if shutil.which("g++") is None:
        pytest.skip("no C++ compiler (g++) for the CUDA emulator")

    class RawModule:
        def __init__(self, code: str, options: Sequence[str] = ()) -> None:
            self._lib = _compile(code, kernels)

        def get_function(self, name: str) -> Callable[..., None]:
            run = getattr(self._lib, f"run_{name}")

            def launch(grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...]) -> None:
                # One 8-byte slot an argument (little-endian, as the driver reads them).
                slots = np.array([a.ctypes.data if isinstance(a, np.ndarray) else arg_bits(a) for a in args], np.int64)
                pointers = (ctypes.c_void_p * len(args))(*[slots.ctypes.data + 8 * i for i in range(len(args))])
                gx, gy = (*grid, 1)[:2]
                run(ctypes.c_uint(gx), ctypes.c_uint(gy), ctypes.c_uint(block[0]), pointers)

            return launch

    return types.SimpleNamespace(
        RawModule=RawModule,
        float32=np.float32,
        int32=np.int32,
        uint32=np.uint32,
        bool_=np.bool_,
        empty=np.empty,
        zeros=np.zeros,
    )
