"""The postproc CUDA sources compile for Hopper (sm_90) with NVRTC, on any machine.

GPU time is scarce and CI has no GPU: a kernel that does not compile should fail here, not
on a lent H100.  NVRTC (PyPI ``nvidia-cuda-nvrtc``) compiles without a device or driver.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import pytest

from services.postproc import backends, sampling_cuda, search_cuda


def _nvrtc() -> ctypes.CDLL:
    spec = importlib.util.find_spec("nvidia")
    libs = [Path(p) / "cu13" / "lib" for p in (spec.submodule_search_locations or [])] if spec else []
    lib_dir = next((d for d in libs if (d / "libnvrtc.so.13").exists()), None)
    if lib_dir is None:
        pytest.skip("NVRTC is not installed (pip install nvidia-cuda-nvrtc)")
    # Loaded first and globally: NVRTC opens its builtins by name, from no search path of ours.
    ctypes.CDLL(str(next(lib_dir.glob("libnvrtc-builtins.so.13*"))), mode=ctypes.RTLD_GLOBAL)
    return ctypes.CDLL(str(lib_dir / "libnvrtc.so.13"))


def compile_sm90(source: str, options: tuple[str, ...]) -> tuple[int, str]:
    """(NVRTC's result code, its log) for ``source`` built to an sm_90 binary."""
    lib = _nvrtc()
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernels.cu", 0, None, None) == 0
    try:
        opts = [o.encode() for o in (*options, "-arch=sm_90")]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        return rc, log.value.decode(errors="replace")
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


@pytest.mark.parametrize(
    ("source", "options"),
    [
        (sampling_cuda.SOURCE, ("-std=c++17",)),
        (search_cuda.SOURCE, ("-std=c++17",)),
        (backends._KERNEL_SOURCE, ()),
    ],
    ids=["sampling", "search", "token_stats"],
)
def test_cuda_source_compiles_for_sm90(source: str, options: tuple[str, ...]) -> None:
    rc, log = compile_sm90(source, options)
    assert rc == 0, log
    assert "warning" not in log.lower(), log
