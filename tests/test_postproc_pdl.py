"""The driver-API launcher: its structures match CUDA's ``CUlaunchConfig``/``CUlaunchAttribute``, and
each argument reaches the driver as the bytes the kernel expects."""

import ctypes

import numpy as np
import pytest

from services.postproc.pdl import DependentLauncher, _LaunchAttribute, _LaunchConfig


def test_launch_structures_match_the_driver_abi() -> None:
    assert ctypes.sizeof(_LaunchAttribute) == 72  # 4-byte id, 4 padding, 64-byte value union
    assert _LaunchAttribute.value.offset == 8
    assert ctypes.sizeof(_LaunchConfig) == 56
    assert _LaunchConfig.stream.offset == 32
    assert _LaunchConfig.attrs.offset == 40
    assert _LaunchConfig.num_attrs.offset == 48


def test_load_never_raises() -> None:
    launcher = DependentLauncher.load()  # None without a CUDA driver (CI), a launcher with one
    assert launcher is None or isinstance(launcher, DependentLauncher)


def test_launch_hands_the_driver_each_argument_and_the_config() -> None:
    seen: list[tuple[tuple[int, ...], tuple[int, ...], int, int, list[int], int]] = []

    def launch_ex(config, function, params, extra) -> int:  # ctypes hands raw values
        c = ctypes.cast(config, ctypes.POINTER(_LaunchConfig)).contents
        slots = ctypes.cast(params, ctypes.POINTER(ctypes.c_void_p))
        values = [ctypes.cast(slots[i], ctypes.POINTER(ctypes.c_int64)).contents.value for i in range(4)]
        assert c.attrs.contents.id == 6 and c.attrs.contents.value[0] == 1  # programmatic serialization on
        seen.append((tuple(c.grid), tuple(c.block), c.shared_mem_bytes, c.stream, values, function))
        return 0

    class Array:  # a CuPy array as the launcher sees one: a device pointer
        class data:
            ptr = 0xDEAD0000

    class Kernel:
        class kernel:  # RawKernel.kernel, the compiled Function
            ptr = 77

    class Stream:
        ptr = 5

    launcher = DependentLauncher(launch_ex)
    launcher.launch(Kernel, 12, 256, (np.int64(-3), np.int32(7), Array(), np.float32(1.5)), Stream, 1024)
    int32_of_1_5 = int(np.float32(1.5).view(np.int32))
    assert seen == [((12, 1, 1), (256, 1, 1), 1024, 5, [-3, 7, 0xDEAD0000, int32_of_1_5], 77)]


def test_a_driver_error_is_a_runtime_error() -> None:
    class Kernel:
        class kernel:
            ptr = 1

    class Stream:
        ptr = 0

    launcher = DependentLauncher(lambda *_: 1)  # CUDA_ERROR_INVALID_VALUE
    with pytest.raises(RuntimeError, match="CUresult 1"):
        launcher.launch(Kernel, 1, 32, (np.int32(0),), Stream)
