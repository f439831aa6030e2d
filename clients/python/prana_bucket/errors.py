"""Typed errors: the gRPC status code as a class, and the server's
``google.rpc.BadRequest`` field violations (and ``RetryInfo``) decoded.

A refused call raises one of these; a refused item of a batch (IngestBatch,
MarkProcessedBatch) is returned as one, with ``index`` set, not raised.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from prana_bucket import pb

_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class FieldViolation:
    """One violated field: its path (``packet.focus_score``) and what is wrong."""

    field: str
    description: str


class BucketError(Exception):
    """A call or a batch item the bucket refused (or could not be reached for)."""

    code: grpc.StatusCode
    message: str
    field_violations: tuple[FieldViolation, ...]
    retry_after: float | None
    index: int | None

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        field_violations: Iterable[FieldViolation] = (),
        *,
        retry_after: float | None = None,
        index: int | None = None,
    ) -> None:
        self.code = code
        self.message = message
        self.field_violations = tuple(field_violations)
        self.retry_after = retry_after
        self.index = index
        super().__init__(self._describe())

    def _describe(self) -> str:
        text = f"{self.code.name}: {self.message}"
        if self.index is not None:
            text = f"item {self.index}: {text}"
        if self.field_violations:
            fields = "; ".join(f"{v.field}: {v.description}" for v in self.field_violations)
            text = f"{text} ({fields})"
        return text

    @property
    def retryable(self) -> bool:
        """True for what a retry may fix: UNAVAILABLE, and a rate limit's
        RESOURCE_EXHAUSTED that says when to come back."""
        return self.code is grpc.StatusCode.UNAVAILABLE or (
            self.code is grpc.StatusCode.RESOURCE_EXHAUSTED and self.retry_after is not None
        )


class InvalidArgumentError(BucketError):
    """Bad input; ``field_violations`` names every violated field."""


class NotFoundError(BucketError):
    """No such packet (a mark for an id the bucket does not have)."""


class UnauthenticatedError(BucketError):
    """No token, or one the bucket does not know."""


class PermissionDeniedError(BucketError):
    """The token's role may not make this call."""


class FailedPreconditionError(BucketError):
    """A lease this consumer no longer holds (ExtendLease)."""


class ResourceExhaustedError(BucketError):
    """Too big, too many, or too fast; ``retry_after`` when a rate limit says."""


class UnavailableError(BucketError):
    """The bucket could not be reached or asked to retry."""


_CLASSES: dict[grpc.StatusCode, type[BucketError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
}
_BY_NUMBER: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


def status_code(number: int) -> grpc.StatusCode:
    """The grpc.StatusCode of a google.rpc.Code number (UNKNOWN if unknown)."""
    return _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def make_error(
    code: grpc.StatusCode,
    message: str,
    field_violations: Iterable[FieldViolation] = (),
    *,
    retry_after: float | None = None,
    index: int | None = None,
) -> BucketError:
    cls = _CLASSES.get(code, BucketError)
    return cls(code, message, field_violations, retry_after=retry_after, index=index)


def from_rpc_error(error: grpc.RpcError) -> BucketError:
    """The typed error of a failed call (blocking or grpc.aio), its details
    decoded from the ``grpc-status-details-bin`` trailer."""
    call: Any = error  # a grpc.Call (blocking) or an AioRpcError: both have these
    code: grpc.StatusCode = call.code() or grpc.StatusCode.UNKNOWN
    message: str = call.details() or ""
    violations: list[FieldViolation] = []
    retry_after: float | None = None
    for key, value in call.trailing_metadata() or ():
        if key != _DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status()
        try:
            status.ParseFromString(value)
        except Exception:  # a malformed trailer leaves just the code and message
            continue
        for detail in status.details:
            bad_request = error_details_pb2.BadRequest()
            retry = error_details_pb2.RetryInfo()
            if detail.Unpack(bad_request):
                violations.extend(
                    FieldViolation(v.field, v.description) for v in bad_request.field_violations
                )
            elif detail.Unpack(retry):
                retry_after = retry.retry_delay.ToTimedelta().total_seconds()
    return make_error(code, message, violations, retry_after=retry_after)


def from_item_error(error: pb.IngestError, index: int) -> BucketError:
    """The typed error of one refused item of a batch."""
    return make_error(
        status_code(error.code),
        error.message,
        (FieldViolation(v.field, v.description) for v in error.field_violations),
        index=index,
    )
