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


_MAX_ARGS = 64


# Scalar kernel arguments as the integer whose low bytes the driver copies (little-endian);
# a dict by exact type, as launches are on the hot path and isinstance chains cost ~0.3 us each.
_SCALAR_BITS: dict[type, Any] = {np.int64: int, np.int32: int, np.float32: lambda a: int(a.view(np.int32))}


def arg_bits(a: Any) -> int:
    """A kernel argument as the 8-byte slot value a launch passes: a scalar's bits or an array's pointer."""
    to_bits = _SCALAR_BITS.get(type(a))
    return to_bits(a) if to_bits is not None else a.data.ptr  # else a CuPy array: its device pointer


class DependentLauncher:
    """Launches CuPy kernels with programmatic stream serialization; ``None`` from
    :meth:`load` when the driver lacks ``cuLaunchKernelEx``.  Not reentrant (one set of
    argument slots): the sampler launches under its backend's lock."""

    def __init__(self, launch_ex: Any) -> None:
        self._launch_ex = launch_ex
        attr = _LaunchAttribute(id=_ATTR_PROGRAMMATIC_STREAM_SERIALIZATION)
        attr.value[0] = 1
        self._attr = attr
        # One 8-byte slot an argument, and the pointers to them, made once: the driver copies
        # the values during the launch call, so the next launch may overwrite them.
        self._values = np.zeros(_MAX_ARGS, np.int64)
        base = self._values.ctypes.data
        self._pointers = (ctypes.c_void_p * _MAX_ARGS)(*[base + 8 * i for i in range(_MAX_ARGS)])
        self._config = _LaunchConfig(attrs=ctypes.pointer(attr), num_attrs=1)

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
        if len(args) > _MAX_ARGS:
            raise RuntimeError(f"{len(args)} kernel arguments, more than {_MAX_ARGS}")
        self._values[: len(args)] = [arg_bits(a) for a in args]
        config = self._config  # reused, as the argument slots are
        config.grid[:] = (grid, 1, 1)
        config.block[:] = (block, 1, 1)
        config.shared_mem_bytes = shared_mem
        config.stream = stream.ptr
        rc = self._launch_ex(ctypes.byref(config), handle, self._pointers, None)
        if rc != 0:
            raise RuntimeError(f"cuLaunchKernelEx failed with CUresult {rc}")
