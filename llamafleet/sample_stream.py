"""Many Sample calls over one `Postproc/SampleStream`: a decoding loop, or an engine sampling
for many sequences, pays a unary call's setup once instead of on every step.

    async with SampleStream(stub) as stream:
        response = await stream.sample(request)      # from any number of tasks at once

Answers are matched to their requests by id.  A request that fails raises the FleetError of its
status (its code and message, as `Sample` would answer); the stream stays open for the others.
A stream that breaks fails every call waiting on it with the stream's status.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from types import TracebackType

import grpc

from llamafleet.errors import DeadlineExceeded, FleetError, Unavailable, error_for_code
from llamafleet.v1 import postproc_pb2, postproc_pb2_grpc

__all__ = ["SampleStream"]

CLOSE_TIMEOUT_S = 10.0


class SampleStream:
    def __init__(self, stub: postproc_pb2_grpc.PostprocStub) -> None:
        self._stub = stub
        self._call: grpc.aio.StreamStreamCall | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[postproc_pb2.SampleResponse]] = {}
        self._write = asyncio.Lock()  # one write at a time on a gRPC stream
        self._broken: FleetError | None = None

    async def __aenter__(self) -> SampleStream:
        self._call = self._stub.SampleStream()
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._call is not None and self._reader is not None
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await self._call.done_writing()
        if kind is not None or self._waiting:
            self._call.cancel()
        # The service ends the stream once it has answered what it read; a service that does
        # not within the close timeout has the stream cancelled under it.
        done, _ = await asyncio.wait({self._reader}, timeout=CLOSE_TIMEOUT_S)
        if not done:
            self._call.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    async def sample(
        self, request: postproc_pb2.SampleRequest, timeout: float | None = 30.0
    ) -> postproc_pb2.SampleResponse:
        """The answer to ``request``; raises the FleetError of its failure, DeadlineExceeded after ``timeout`` s."""
        if self._call is None or self._reader is None:
            raise RuntimeError("use the stream inside `async with`")
        request_id = next(self._ids)
        answer: asyncio.Future[postproc_pb2.SampleResponse] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = answer
        try:
            if self._reader.done():
                raise self._broken or Unavailable("the SampleStream ended")
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                # A write that finds the stream closed: the reader fails every waiting call.
                async with self._write:
                    await self._call.write(postproc_pb2.SampleStreamRequest(id=request_id, request=request))
            try:
                return await asyncio.wait_for(answer, timeout)
            except TimeoutError:
                raise DeadlineExceeded(f"no answer on the SampleStream within {timeout} s") from None
        finally:
            self._waiting.pop(request_id, None)

    async def _read(self) -> None:
        assert self._call is not None
        try:
            async for item in self._call:
                answer = self._waiting.pop(item.id, None)
                if answer is None or answer.done():
                    continue
                if item.WhichOneof("result") == "failure":
                    answer.set_exception(error_for_code(item.failure.code, item.failure.message))
                else:
                    answer.set_result(item.response)
            self._broken = Unavailable("the SampleStream ended")
        except grpc.aio.AioRpcError as exc:
            self._broken = error_for_code(exc.code().value[0], exc.details() or exc.code().name)
        except asyncio.CancelledError:
            self._broken = Unavailable("the SampleStream was closed")
        finally:
            for answer in self._waiting.values():
                if not answer.done():
                    answer.set_exception(self._broken or Unavailable("the SampleStream ended"))
