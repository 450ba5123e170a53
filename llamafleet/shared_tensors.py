"""Request tensors in shared memory, for a caller on the same host as postproc.

Large tensors (a batch of 131072-wide logits is 512 KiB a row) cost most of a call when they
travel inside gRPC messages: serialised, copied through HTTP/2 and parsed again.  A caller on
postproc's host instead writes them into a region of POSIX shared memory that postproc has
mapped (and page-locked, so the GPU reads it by DMA), and sends the region's name and an
offset.  A slice must stay unchanged until the call that reads it returns.

    region = SharedTensorRegion(64 << 20)
    await region.register(stub)
    request = SampleRequest(logits=region.put(0, logits), rows=...)
    ...
    await region.unregister(stub)
    region.close()
"""

from __future__ import annotations

import math
from multiprocessing import shared_memory

import numpy as np
import numpy.typing as npt

from llamafleet.v1 import postproc_pb2, postproc_pb2_grpc

__all__ = ["SharedTensorRegion"]

_WIRE_DTYPES = {
    np.dtype("<f4"): postproc_pb2.TENSOR_DTYPE_FLOAT32,
    np.dtype("<f2"): postproc_pb2.TENSOR_DTYPE_FLOAT16,
}


class SharedTensorRegion:
    """``byte_size`` bytes of new POSIX shared memory, named ``name`` to postproc (default:
    the object's own name), removed by :meth:`close`."""

    def __init__(self, byte_size: int, name: str | None = None) -> None:
        self._shm = shared_memory.SharedMemory(create=True, size=byte_size)
        self.byte_size = byte_size
        self.name = name or self._shm.name
        self._bytes: npt.NDArray[np.uint8] | None = np.ndarray((byte_size,), np.uint8, buffer=self._shm.buf)

    def register_request(self) -> postproc_pb2.RegisterSharedMemoryRequest:
        return postproc_pb2.RegisterSharedMemoryRequest(region=self.name, key=self._shm.name, byte_size=self.byte_size)

    async def register(self, stub: postproc_pb2_grpc.PostprocStub, timeout: float = 30) -> bool:
        """Register with the postproc behind ``stub`` (again, after a NOT_FOUND); whether it pinned the region."""
        response = await stub.RegisterSharedMemory(self.register_request(), timeout=timeout)
        return response.pinned

    async def unregister(self, stub: postproc_pb2_grpc.PostprocStub, timeout: float = 30) -> None:
        await stub.UnregisterSharedMemory(postproc_pb2.UnregisterSharedMemoryRequest(region=self.name), timeout=timeout)

    def array(self, offset: int, shape: tuple[int, ...], dtype: npt.DTypeLike = np.float32) -> npt.NDArray[np.floating]:
        """A writable array in the region at ``offset``, e.g. for a model to write its logits into."""
        if self._bytes is None:
            raise ValueError("the region is closed")
        dt = np.dtype(dtype)
        nbytes = math.prod(shape) * dt.itemsize
        if offset < 0 or offset % dt.itemsize or offset + nbytes > self.byte_size:
            raise ValueError(
                f"{nbytes} bytes at offset {offset} leave the region ({self.byte_size} bytes) "
                f"or the offset is not a multiple of {dt.itemsize}"
            )
        return self._bytes[offset : offset + nbytes].view(dt).reshape(shape)

    def tensor(self, offset: int, shape: tuple[int, ...], dtype: npt.DTypeLike = np.float32) -> postproc_pb2.Tensor:
        """The Tensor that names the array of ``shape`` at ``offset`` (float32 or float16)."""
        wire = _WIRE_DTYPES.get(np.dtype(dtype).newbyteorder("<"))
        if wire is None:
            raise ValueError(f"shared-memory tensors are float32 or float16, not {np.dtype(dtype)}")
        self.array(offset, shape, dtype)  # checks the bounds
        return postproc_pb2.Tensor(
            dtype=wire,
            shape=list(shape),
            shared_memory=postproc_pb2.SharedMemorySlice(region=self.name, offset=offset),
        )

    def put(self, offset: int, values: npt.NDArray[np.floating]) -> postproc_pb2.Tensor:
        """Copy ``values`` into the region at ``offset``; the Tensor naming them."""
        self.array(offset, values.shape, values.dtype)[...] = values
        return self.tensor(offset, values.shape, values.dtype)

    def close(self) -> None:
        """Unmap and remove the shared-memory object (postproc keeps its mapping until unregistered).
        Arrays from :meth:`array` must be gone by then."""
        if self._bytes is None:
            return
        self._bytes = None
        self._shm.close()
        self._shm.unlink()

    def __enter__(self) -> SharedTensorRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
