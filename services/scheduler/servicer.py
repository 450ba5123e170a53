"""The Scheduler gRPC API on rank 0: a thin adapter over the Dispatcher and the Membership."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from llamafleet.errors import InvalidArgument
from llamafleet.generation import (
    GenerationLimits,
    validate_inputs,
    validate_params,
    validate_policy,
    validate_prompt,
)
from llamafleet.storage_client import StorageClient
from llamafleet.telemetry import inject_context
from llamafleet.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.scheduler.dispatch import Dispatcher
from services.scheduler.membership import Membership

# Most workers one AddWorkers call starts.
MAX_ADD = 64


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(
        self,
        dispatcher: Dispatcher,
        membership: Membership,
        limits: GenerationLimits,
        storage: StorageClient,
        rollout_timeout_s: float,
        started_at: float,
    ) -> None:
        self._dispatcher = dispatcher
        self._membership = membership
        self._limits = limits
        self._storage = storage
        self._rollout_timeout_s = rollout_timeout_s
        self._started_at = Timestamp()
        self._started_at.FromNanoseconds(int(started_at * 1e9))

    async def Submit(
        self, request: scheduler_pb2.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.SubmitResponse]:
        validate_prompt(request.prompt, self._limits)
        validate_params(request.params, self._limits)
        validate_policy(request.policy)
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        if not request.params.max_tokens:
            request.params.max_tokens = self._limits.default_max_tokens
        if len(request.resume_tokens) > request.params.max_tokens:
            raise InvalidArgument(
                "resume_tokens",
                f"holds {len(request.resume_tokens)} tokens, more than max_tokens ({request.params.max_tokens})",
            )
        async for event in self._dispatcher.submit(request, inject_context()):
            yield event

    async def ClusterStatus(
        self, request: scheduler_pb2.ClusterStatusRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ClusterStatusResponse:
        status = self._dispatcher.status()
        status.started_at.CopyFrom(self._started_at)
        status.target_workers = self._membership.target
        status.pid = os.getpid()
        return status

    async def LoadModel(
        self, request: scheduler_pb2.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.LoadModelResponse:
        if not request.model:
            raise InvalidArgument("model", "must name a model: name:tag or a sha256 digest")
        info = await self._storage.resolve(request.model)
        await self._membership.roll_out(info.sha256, self._rollout_timeout_s)
        return scheduler_pb2.LoadModelResponse(model_sha256=info.sha256)

    async def AddWorkers(
        self, request: scheduler_pb2.AddWorkersRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.AddWorkersResponse:
        count = request.count or 1
        if count > MAX_ADD:
            raise InvalidArgument("count", f"is {count}; at most {MAX_ADD} workers per call")
        return scheduler_pb2.AddWorkersResponse(workers=await self._membership.add(count, request.host))

    async def DrainWorker(
        self, request: scheduler_pb2.DrainWorkerRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.DrainWorkerResponse:
        return scheduler_pb2.DrainWorkerResponse(worker=await self._membership.drain(request.rank))

    async def EmbedTokens(
        self, request: scheduler_pb2.EmbedTokensRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.EmbedTokensResponse:
        validate_inputs(request.inputs, self._limits)
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        return await self._dispatcher.embed(request, inject_context())
