"""The driver-API launch structures match CUDA's ``CUlaunchConfig``/``CUlaunchAttribute`` layout."""

import ctypes

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
