"""The public Gateway gRPC API: a thin adapter over GatewayCore (the HTTP face shares it)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from llamafleet.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway.core import Caller, GatewayCore


def _caller(core: GatewayCore, context: grpc.aio.ServicerContext) -> Caller:
    authorization = next((value for key, value in context.invocation_metadata() or () if key == "authorization"), None)
    return core.authenticate(authorization if isinstance(authorization, str) else None)


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, core: GatewayCore) -> None:
        self._core = core

    async def Generate(
        self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        # The caller's deadline bounds the scheduler call; a cancel ends this generator, which cancels it.
        caller = _caller(self._core, context)
        async for event in self._core.generate(request, caller, timeout=context.time_remaining()):
            yield event

    async def ListModels(
        self, request: gateway_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListModelsResponse:
        _caller(self._core, context)
        return await self._core.list_models()

    async def Embed(
        self, request: gateway_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.EmbedResponse:
        return await self._core.embed(request, _caller(self._core, context), timeout=context.time_remaining())

    async def AddDocuments(
        self, request: gateway_pb2.AddDocumentsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.AddDocumentsResponse:
        return await self._core.add_documents(request, _caller(self._core, context), timeout=context.time_remaining())

    async def Search(
        self, request: gateway_pb2.SearchRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.SearchResponse:
        return await self._core.search(request, _caller(self._core, context), timeout=context.time_remaining())
