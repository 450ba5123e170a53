"""The shared-memory region registry's rules and leases (the service reading from a region is
tested in test_postproc_service.py)."""

from __future__ import annotations

import gc

import pytest

from llamafleet.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from llamafleet.shared_tensors import SharedTensorRegion
from services.postproc.shared_memory import SharedRegions


class Pins:
    """Records what the registry pins and unpins (the CuPy backend's cudaHostRegister)."""

    def __init__(self) -> None:
        self.pinned: set[int] = set()

    def pin(self, address: int, size: int) -> bool:
        self.pinned.add(address)
        return True

    def unpin(self, address: int) -> None:
        self.pinned.remove(address)


def test_a_region_stays_pinned_until_the_last_view_of_it_is_gone() -> None:
    pins = Pins()
    regions = SharedRegions(1 << 20, pins.pin, pins.unpin)
    with SharedTensorRegion(4096) as shm:
        assert regions.register("a", shm.register_request().key, 4096)
        assert regions.register("a", shm.register_request().key, 4096)  # the same again: a no-op
        shm.array(0, (4,))[...] = [1, 2, 3, 4]
        view = regions.view("logits", "a", 0, 16).view("<f4")
        assert view.tolist() == [1, 2, 3, 4] and not view.flags.writeable
        assert regions.unregister("a") and not regions.unregister("a")
        assert len(pins.pinned) == 1  # a call still reads it
        with pytest.raises(NotFound, match="register it"):
            regions.view("logits", "a", 0, 16)
        del view
        gc.collect()
        assert not pins.pinned


def test_region_rules() -> None:
    pins = Pins()
    regions = SharedRegions(8192, pins.pin, pins.unpin)
    with SharedTensorRegion(4096) as shm, SharedTensorRegion(8192) as big:
        key = shm.register_request().key
        with pytest.raises(InvalidArgument, match=r"^key"):
            regions.register("a", "../etc/passwd", 16)
        with pytest.raises(NotFound, match="no shared-memory object"):
            regions.register("a", "llamafleet-no-such-object", 16)
        with pytest.raises(InvalidArgument, match=r"^byte_size"):
            regions.register("a", key, 4097)
        regions.register("a", key, 4096)
        with pytest.raises(AlreadyExists, match="unregister it first"):
            regions.register("a", key, 1024)
        with pytest.raises(ResourceExhausted, match="SHARED_MEMORY_BYTES"):
            regions.register("b", big.register_request().key, 8192)
        with pytest.raises(InvalidArgument, match=r"^logits\.offset"):
            regions.view("logits", "a", 4090, 16)
        assert regions.bytes_used == 4096 and len(regions) == 1
        regions.close()
        assert not pins.pinned and len(regions) == 0
