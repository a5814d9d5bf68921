"""Domain exceptions and the one table that maps them to HTTP statuses and error codes."""

from typing import Any

from grpc import StatusCode
from pydantic import BaseModel, Field

from service.validation import describe


class ErrorDetail(BaseModel):
    code: str = Field(description="stable, for programs: invalid_request, not_found, ...")
    message: str = Field(description="for people: what went wrong and what to do")
    details: dict[str, Any] = Field(
        default_factory=dict, description="for a 422, `fields`: each bad field and why"
    )


class ErrorResponse(BaseModel):
    """The body of every failed request, whatever its status."""

    error: ErrorDetail


# Declared on every route: FastAPI's own 422 schema (HTTPValidationError) is not what we send.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        ("4XX", "the request cannot be served as it is; error.message says why"),
        ("5XX", "the service or a worker failed; the request may be retried"),
    )
}


class ServiceError(Exception):
    """A failure the caller can act on; rendered as {"error": {"code", "message", "details"}}."""

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}


class BadRequest(ServiceError):
    pass


class Unauthorized(ServiceError):
    pass


class NotFound(ServiceError):
    pass


class Conflict(ServiceError):
    pass


class Gone(ServiceError):
    """What the request names was there once and its files are gone for good."""


class PayloadTooLarge(ServiceError):
    pass


class WorkerFailed(ServiceError):
    """A worker broke while answering a request (not the request's fault)."""


class ServiceUnavailable(ServiceError):
    """What the request needs (the broker, a result backend) cannot be reached now."""


class GatewayTimeout(ServiceError):
    """No worker answered in time."""


class InvalidSpec(ServiceError):
    """A request body that parsed but breaks a rule; details["fields"] names each bad field."""

    def __init__(self, fields: list[dict[str, str]]) -> None:
        listed = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
        super().__init__(f"invalid request: {listed}", {"fields": fields})


# exception class -> (HTTP status, error code, gRPC status): REST and gRPC answer alike.
ERROR_TABLE: dict[type[ServiceError], tuple[int, str, StatusCode]] = {
    BadRequest: (400, "bad_request", StatusCode.INVALID_ARGUMENT),
    Unauthorized: (401, "unauthorized", StatusCode.UNAUTHENTICATED),
    NotFound: (404, "not_found", StatusCode.NOT_FOUND),
    Conflict: (409, "conflict", StatusCode.FAILED_PRECONDITION),
    Gone: (410, "gone", StatusCode.NOT_FOUND),
    PayloadTooLarge: (413, "payload_too_large", StatusCode.RESOURCE_EXHAUSTED),
    InvalidSpec: (422, "invalid_request", StatusCode.INVALID_ARGUMENT),
    WorkerFailed: (502, "worker_error", StatusCode.INTERNAL),
    ServiceUnavailable: (503, "unavailable", StatusCode.UNAVAILABLE),
    GatewayTimeout: (504, "worker_timeout", StatusCode.DEADLINE_EXCEEDED),
}
UNEXPECTED = (500, "internal_error", StatusCode.INTERNAL)


def classify(exc: ServiceError) -> tuple[int, str, StatusCode]:
    for cls in type(exc).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return UNEXPECTED


def invalid_spec(errors: list[dict[str, Any]], body: object, model: Any = None) -> InvalidSpec:
    """pydantic's errors for `body` as one InvalidSpec naming each bad field (`model`: the type
    `body` was validated as, for the field an unknown one is closest to)."""
    return InvalidSpec(describe(errors, body, model))


def unstorable(exc: Exception) -> BadRequest:
    """The database refused a value of the request (sqlalchemy's DataError: text with NUL, a
    number out of its column's range): the request's fault, answered as a 400. Only the
    database's own first line is shown, not the statement."""
    reason = str(getattr(exc, "orig", exc)).splitlines()[0]
    return BadRequest(f"a value in the request cannot be stored: {reason}")
