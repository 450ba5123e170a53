"""Request tensors in shared memory: the region registry's rules and leases, and the service
reading Sample logits and pooled hidden states from a caller's region (NumPy backend)."""

from __future__ import annotations

import gc

import grpc
import numpy as np
import pytest

from llamafleet.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from llamafleet.shared_tensors import SharedTensorRegion
from llamafleet.v1 import postproc_pb2
from services.postproc.sampling import RowParams, make_sample_batch, sample_numpy
from services.postproc.shared_memory import SharedRegions
from tests.test_postproc_service import Postproc, logits, postproc, status_of  # noqa: F401 (fixture)


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


@pytest.mark.asyncio
async def test_sample_and_pool_read_a_callers_shared_memory(postproc: Postproc) -> None:  # noqa: F811
    x = logits(3)
    with SharedTensorRegion(1 << 20) as shm:
        assert not await shm.register(postproc.stub)  # NumPy reads it where it is: nothing to pin
        rows = [postproc_pb2.SamplingParams(top_k=40, top_p=0.9, seed=7, top_logprobs=2)] * 3
        response = await postproc.stub.Sample(postproc_pb2.SampleRequest(logits=shm.put(4096, x), rows=rows))
        want = sample_numpy(make_sample_batch(x, [RowParams(top_k=40, top_p=0.9, seed=7, top_logprobs=2)] * 3))
        assert [t.token for t in response.tokens] == want.token.tolist()
        np.testing.assert_allclose([t.logprob for t in response.tokens], want.logprob, rtol=1e-6)

        hidden = np.random.default_rng(1).normal(size=(2, 3, 8)).astype(np.float16)
        pooled = await postproc.stub.PoolEmbeddings(
            postproc_pb2.PoolEmbeddingsRequest(
                hidden_states=shm.put(0, hidden), pooling=postproc_pb2.POOLING_MEAN, normalize=False
            )
        )
        got = np.frombuffer(pooled.embeddings.data, "<f4").reshape(2, 8)
        np.testing.assert_allclose(got, hidden.astype(np.float32).mean(axis=1), rtol=1e-3)

        status = await postproc.stub.DeviceStatus(postproc_pb2.DeviceStatusRequest())
        assert (status.shared_memory_regions, status.shared_memory_bytes_used) == (1, 1 << 20)

        past_end = shm.tensor(1 << 19, (3, 512))
        past_end.shared_memory.offset = (1 << 20) - 8
        code, details = await status_of(postproc.stub.Sample(postproc_pb2.SampleRequest(logits=past_end, rows=rows)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("logits.shared_memory.offset:")

        await shm.unregister(postproc.stub)
        code, details = await status_of(
            postproc.stub.Sample(postproc_pb2.SampleRequest(logits=shm.tensor(4096, x.shape), rows=rows))
        )
        assert code == grpc.StatusCode.NOT_FOUND and "RegisterSharedMemory" in details
