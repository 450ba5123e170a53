"""Programmatic dependent launch (Hopper and later) through the CUDA driver API.

CuPy launches kernels without launch attributes.  A kernel launched here with
programmatic stream serialization may start while the kernel before it on the stream is
still running; it must call ``griddepcontrol.wait`` before it reads that kernel's output.
Launched without the attribute, that wait returns at once, so the kernel is correct both ways.
Importable without CuPy or a GPU (ctypes only).
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

_ATTR_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: id, padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_uint32), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int32 * 16)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [
        ("grid", ctypes.c_uint32 * 3),
        ("block", ctypes.c_uint32 * 3),
        ("shared_mem_bytes", ctypes.c_uint32),
        ("stream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(_LaunchAttribute)),
        ("num_attrs", ctypes.c_uint32),
    ]


def _c_arg(a: Any) -> ctypes._SimpleCData:
    if isinstance(a, np.int64):
        return ctypes.c_int64(int(a))
    if isinstance(a, np.int32):
        return ctypes.c_int32(int(a))
    if isinstance(a, np.float32):
        return ctypes.c_float(float(a))
    return ctypes.c_void_p(a.data.ptr)  # a CuPy array: its device pointer


class DependentLauncher:
    """Launches CuPy kernels with programmatic stream serialization; ``None`` from
    :meth:`load` when the driver lacks ``cuLaunchKernelEx``."""

    def __init__(self, launch_ex: Any) -> None:
        self._launch_ex = launch_ex
        attr = _LaunchAttribute(id=_ATTR_PROGRAMMATIC_STREAM_SERIALIZATION)
        attr.value[0] = 1
        self._attr = attr

    @classmethod
    def load(cls) -> DependentLauncher | None:
        try:
            launch_ex = ctypes.CDLL("libcuda.so.1").cuLaunchKernelEx
        except (OSError, AttributeError):
            return None
        launch_ex.restype = ctypes.c_int
        launch_ex.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        return cls(launch_ex)

    def launch(
        self, kernel: Any, grid: int, block: int, args: tuple[Any, ...], stream: Any, shared_mem: int = 0
    ) -> None:
        """Enqueue ``kernel`` (a CuPy ``RawKernel``) on ``stream``; raises ``RuntimeError`` when
        the kernel has no driver handle or the driver refuses, so the caller can launch plainly."""
        function = getattr(kernel, "kernel", kernel)  # RawKernel.kernel: the compiled Function
        handle = getattr(function, "ptr", None)
        if not handle:
            raise RuntimeError(f"no CUfunction handle on {type(kernel).__name__}")
        values = [_c_arg(a) for a in args]
        pointers = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
        config = _LaunchConfig(
            grid=(ctypes.c_uint32 * 3)(grid, 1, 1),
            block=(ctypes.c_uint32 * 3)(block, 1, 1),
            shared_mem_bytes=shared_mem,
            stream=stream.ptr,
            attrs=ctypes.pointer(self._attr),
            num_attrs=1,
        )
        rc = self._launch_ex(ctypes.byref(config), handle, pointers, None)
        if rc != 0:
            raise RuntimeError(f"cuLaunchKernelEx failed with CUresult {rc}")
