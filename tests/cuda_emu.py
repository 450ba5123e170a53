"""A stand-in for the parts of CuPy our kernel modules use, running the kernels on the CPU
through ``cuda_emu.h`` (built with the system C++ compiler), so their logic is tested in CI
without a GPU.  Device arrays are NumPy arrays; streams and events are immediate; the few
inline PTX instructions the kernels use are rewritten to C++ (clusters of one CTA only)."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import re
import shutil
import subprocess
import tempfile
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.postproc.pdl import arg_bits

_HEADER = Path(__file__).with_name("cuda_emu.h")
_BUILD = Path(tempfile.gettempdir()) / "llamafleet-cuda-emu"

# The PTX the kernels inline, by its first instruction, as C++ over the asm operands {0}, {1}...
_PTX = {
    "mov.u32 %0, %%cluster_ctarank": "{0} = 0u;",
    "mov.u32 %0, %%cluster_nctarank": "{0} = 1u;",
    "barrier.cluster.arrive.aligned": "__syncthreads();",
    "mapa.shared::cluster": "{0} = emu_map({1}, {2});",
    "ld.shared::cluster.f64": "{0} = emu_ld_shared<double>({1});",
    "ld.shared::cluster.f32": "{0} = emu_ld_shared<float>({1});",
    "ld.shared::cluster.u32": "{0} = emu_ld_shared<unsigned>({1});",
    "cvt.f32.f16": "{0} = static_cast<float>(emu_bits<_Float16>({1}));",
    "cvt.rn.f16.f32": "{0} = emu_bits<unsigned short>(static_cast<_Float16>({1}));",
    "ex2.approx.ftz.f32": "{0} = std::exp2({1}); if (std::fabs({0}) < 1.17549435e-38f) {0} = 0.0f;",
    "set.ge.u32.f32": "{0} = {1} >= {2} ? 0xffffffffu : 0u;",
    "griddepcontrol.launch_dependents": ";",  # kernels run one after another here
    "griddepcontrol.wait": ";",
}
_ASM = re.compile(r'asm(?:\s+volatile)?\s*\(\s*"((?:[^"\\]|\\.)*)"(.*?)\);', re.S)
_OPERAND = re.compile(r'"[=+]?\w"\s*\(((?:[^()]|\([^()]*\))*)\)')
_DYNAMIC_SHARED = re.compile(r"extern __shared__ (?:__align__\(\d+\) )?(\w+) (\w+)\[\];")
_CLUSTER_DIMS = re.compile(r"__cluster_dims__\((\d+)[^)]*\)\s+(\w+)\s*\(")


def _rewrite_asm(match: re.Match[str]) -> str:
    ptx = match.group(1)
    for prefix, cpp in _PTX.items():
        if ptx.startswith(prefix):
            return "{ " + cpp.format(*_OPERAND.findall(match.group(2))) + " }"
    raise NotImplementedError(f"cuda_emu: no emulation of the PTX {ptx!r}")


def emulable(source: str) -> str:
    """``source`` with its inline PTX and dynamic shared memory in the emulator's terms."""
    source = _DYNAMIC_SHARED.sub(r"\1* \2 = emu_dynamic_shared<\1>();", source)
    return _ASM.sub(_rewrite_asm, source)


def _compile(source: str, kernels: Sequence[str]) -> ctypes.CDLL:
    exports = "".join(f"EMU_EXPORT({k})\n" for k in kernels)
    code = f'#include "{_HEADER}"\n{emulable(source)}\n{exports}'
    tag = hashlib.sha256((code + _HEADER.read_text()).encode()).hexdigest()[:16]
    _BUILD.mkdir(exist_ok=True)
    lib = _BUILD / f"kernels-{tag}.so"
    if not lib.exists():
        cpp = lib.with_suffix(".cpp")
        cpp.write_text(code)
        partial = lib.with_suffix(".tmp")
        flags = ["-std=c++20", "-O1", "-ffp-contract=off", "-shared", "-fPIC", "-pthread"]
        built = subprocess.run(
            ["g++", *flags, "-o", str(partial), str(cpp)], capture_output=True, text=True, timeout=600
        )
        if built.returncode != 0:
            raise RuntimeError(f"the CUDA emulator build failed:\n{built.stderr[-4000:]}")
        partial.rename(lib)  # whole or absent, for concurrent test runs
    return ctypes.CDLL(str(lib))


class EmuArray(np.ndarray):
    """A "device" array: a NumPy array with CuPy's ``set``/``get`` and ``data.ptr``."""

    @property
    def data(self) -> Any:  # type: ignore[override]
        return types.SimpleNamespace(ptr=self.ctypes.data)

    def set(self, host: Any, stream: Any = None) -> None:
        np.copyto(self.view(np.ndarray), np.asarray(host).reshape(self.shape))

    def get(self, stream: Any = None, out: Any = None) -> np.ndarray:
        if out is None:
            return np.array(self.view(np.ndarray))
        np.copyto(out, self.view(np.ndarray))
        return out


class _Kernel:
    def __init__(self, name: str, run: Any, cluster: int) -> None:
        self._name, self._run, self._cluster = name, run, cluster
        self.max_dynamic_shared_size_bytes = 0

    def __call__(
        self, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...], shared_mem: int = 0
    ) -> None:
        if self._cluster > 1:  # each CTA would take itself for a whole cluster and compute nonsense
            raise NotImplementedError(f"cuda_emu: {self._name} runs in clusters of {self._cluster} CTAs")
        # One 8-byte slot an argument (little-endian, as the driver reads them).
        slots = np.array([a.ctypes.data if isinstance(a, np.ndarray) else arg_bits(a) for a in args], np.int64)
        pointers = (ctypes.c_void_p * len(args))(*[slots.ctypes.data + 8 * i for i in range(len(args))])
        gx, gy = (*grid, 1)[:2]
        self._run(ctypes.c_uint(gx), ctypes.c_uint(gy), ctypes.c_uint(block[0]), ctypes.c_uint(shared_mem), pointers)


class EmuStream:
    """Work is done when it is enqueued: every stream and event is always complete."""

    ptr = 0

    def __enter__(self) -> EmuStream:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def record(self) -> EmuStream:
        return self

    def synchronize(self) -> None:
        return None


_PROBE = """
#include <atomic>
#include <barrier>
int main() { std::barrier<> b(1); b.arrive_and_wait(); unsigned u = 0; std::atomic_ref<unsigned>(u).fetch_add(1);
             _Float16 h = static_cast<_Float16>(1.5f); return static_cast<float>(h) == 1.5f && u == 1 ? 0 : 1; }
"""


@functools.cache
def _compiler_problem() -> str | None:
    """Why the system compiler cannot build the emulator (None: it can)."""
    if shutil.which("g++") is None:
        return "no C++ compiler (g++)"
    with tempfile.TemporaryDirectory() as tmp:
        source, binary = Path(tmp) / "probe.cpp", Path(tmp) / "probe"
        source.write_text(_PROBE)
        built = subprocess.run(["g++", "-std=c++20", "-pthread", "-o", str(binary), str(source)], capture_output=True)
        if built.returncode != 0 or subprocess.run([str(binary)]).returncode != 0:
            return "g++ lacks C++20 std::barrier / std::atomic_ref or _Float16 (GCC 12 or later has them)"
    return None


def emulated_cupy(kernels: Sequence[str]) -> Any:
    """A ``cupy`` look-alike whose ``RawModule`` builds ``kernels`` for the emulator."""
    problem = _compiler_problem()
    if problem is not None:
        pytest.skip(f"the CUDA emulator cannot be built here: {problem}")

    class RawModule:
        def __init__(self, code: str, options: Sequence[str] = ()) -> None:
            self._lib = _compile(code, kernels)
            self._clusters = {name: int(size) for size, name in _CLUSTER_DIMS.findall(code)}

        def get_function(self, name: str) -> _Kernel:
            return _Kernel(name, getattr(self._lib, f"run_{name}"), self._clusters.get(name, 1))

    def empty(shape: Any, dtype: Any = np.float64) -> EmuArray:
        return np.empty(shape, dtype).view(EmuArray)

    def zeros(shape: Any, dtype: Any = np.float64) -> EmuArray:
        return np.zeros(shape, dtype).view(EmuArray)

    return types.SimpleNamespace(
        RawModule=RawModule,
        cuda=types.SimpleNamespace(
            alloc_pinned_memory=bytearray,
            # No host memory is page-locked here (cudaMemoryTypeUnregistered).
            runtime=types.SimpleNamespace(pointerGetAttributes=lambda ptr: types.SimpleNamespace(type=0)),
        ),
        empty=empty,
        zeros=zeros,
        float16=np.float16,
        float32=np.float32,
        int32=np.int32,
        uint8=np.uint8,
        uint32=np.uint32,
        bool_=np.bool_,
    )
