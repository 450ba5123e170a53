"""Failures a client can act on, each tied to the gRPC status it is reported with.

Servicers and domain code raise these; the server interceptor in `llamafleet.server` turns
them into statuses in one place, so no servicer calls `context.abort` by hand.
"""

from __future__ import annotations

import grpc


class FleetError(Exception):
    """Base of every failure reported to a caller with a specific status."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(FleetError):
    """A request field is malformed or out of range; the message names the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(FleetError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(FleetError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(FleetError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(FleetError):
    """A dependency (worker, SeaweedFS, another service) cannot be reached; retrying may help."""

    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(FleetError):
    """A limit was hit; `retry_after` (seconds) is sent as trailing metadata when known."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DataLoss(FleetError):
    """Stored bytes do not match their digest."""

    code = grpc.StatusCode.DATA_LOSS


class DeadlineExceeded(FleetError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(FleetError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(FleetError):
    code = grpc.StatusCode.PERMISSION_DENIED


def error_for_code(code: int, message: str) -> FleetError:
    """A FleetError reported with gRPC status `code` (a google.rpc.Code value), e.g. one a
    worker sent over MPI, so the caller sees the status the failure had at its source."""
    error = FleetError(message)
    status = next((s for s in grpc.StatusCode if s.value[0] == code), grpc.StatusCode.UNKNOWN)
    error.code = grpc.StatusCode.INTERNAL if status is grpc.StatusCode.OK else status
    return error
