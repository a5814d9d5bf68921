"""Domain exceptions and the one table that maps them to HTTP statuses and error codes."""

from typing import Any


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


class PayloadTooLarge(ServiceError):
    pass


class InvalidSpec(ServiceError):
    """A request body that parsed but breaks a rule; details["fields"] names each bad field."""

    def __init__(self, fields: list[dict[str, str]]) -> None:
        listed = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
        super().__init__(f"invalid request: {listed}", {"fields": fields})


# exception class -> (HTTP status, error code)
ERROR_TABLE: dict[type[ServiceError], tuple[int, str]] = {
    BadRequest: (400, "bad_request"),
    Unauthorized: (401, "unauthorized"),
    NotFound: (404, "not_found"),
    Conflict: (409, "conflict"),
    PayloadTooLarge: (413, "payload_too_large"),
    InvalidSpec: (422, "invalid_request"),
}


def http_status_and_code(exc: ServiceError) -> tuple[int, str]:
    for cls in type(exc).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return 500, "internal_error"
