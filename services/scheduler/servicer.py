"""The Scheduler gRPC API on rank 0: a thin adapter over the Dispatcher."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc

from llamafleet.errors import InvalidArgument
from llamafleet.generation import GenerationLimits, validate_params, validate_policy, validate_prompt
from llamafleet.storage_client import StorageClient
from llamafleet.telemetry import inject_context
from llamafleet.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.scheduler.dispatch import Dispatcher


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(
        self, dispatcher: Dispatcher, limits: GenerationLimits, storage: StorageClient, rollout_timeout_s: float
    ) -> None:
        self._dispatcher = dispatcher
        self._limits = limits
        self._storage = storage
        self._rollout_timeout_s = rollout_timeout_s

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
        async for event in self._dispatcher.submit(request, inject_context()):
            yield event

    async def ClusterStatus(
        self, request: scheduler_pb2.ClusterStatusRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ClusterStatusResponse:
        return self._dispatcher.status()

    async def LoadModel(
        self, request: scheduler_pb2.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.LoadModelResponse:
        if not request.model:
            raise InvalidArgument("model", "must name a model: name:tag or a sha256 digest")
        info = await self._storage.resolve(request.model)
        await self._dispatcher.roll_out(info.sha256, self._rollout_timeout_s)
        return scheduler_pb2.LoadModelResponse(model_sha256=info.sha256)
