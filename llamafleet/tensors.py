"""Float32 arrays as the contracts' `Tensor` (raw little-endian bytes with a shape), both ways."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from llamafleet.v1 import postproc_pb2


def float32_tensor(array: npt.ArrayLike) -> postproc_pb2.Tensor:
    values = np.asarray(array, dtype="<f4")
    return postproc_pb2.Tensor(dtype=postproc_pb2.TENSOR_DTYPE_FLOAT32, shape=list(values.shape), data=values.tobytes())


def float32_array(tensor: postproc_pb2.Tensor) -> npt.NDArray[np.float32]:
    """A read-only view of a float32 tensor's bytes (one its sender built with float32_tensor)."""
    return np.frombuffer(tensor.data, dtype="<f4").reshape(tuple(tensor.shape))
