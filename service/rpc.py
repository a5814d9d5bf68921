"""What every gRPC method shares: the API key from metadata, one database session per call
(committed in one place, off the event loop), and errors mapped by service.errors' table."""

import asyncio
import json
import logging
from collections.abc import Callable
from typing import TypeVar

import grpc
from pydantic import Field, ValidationError
from sqlalchemy.exc import DataError
from sqlalchemy.orm import Session

from service.auth.service import authenticate
from service.config import Settings
from service.contract.limits import MAX_ID, Strict
from service.db import session_scope
from service.errors import ServiceError, classify, invalid_spec, unstorable
from service.models import Project

log = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M", bound=Strict)

# Trailing metadata on an error: the REST error's code, and its details as JSON.
ERROR_CODE_KEY = "gvpo-error-code"
ERROR_DETAILS_KEY = "gvpo-error-details"


def metadata(context: grpc.aio.ServicerContext, key: str) -> str | None:
    return next((value for k, value in context.invocation_metadata() or () if k == key), None)


def authenticated(
    context: grpc.aio.ServicerContext, settings: Settings
) -> Callable[[Session], Project]:
    """The project of the call's API key (`authorization: Bearer <key>`), for `call`."""
    return lambda session: authenticate(
        session, metadata(context, "authorization"), settings.api_key_pepper
    )


class RunRef(Strict):
    """A request's run_id, with the limit a REST path's id has."""

    run_id: str = Field(max_length=MAX_ID)


def checked(model: type[M], request) -> M:
    """The fields of the request message that `model` names, validated against the limits of
    the REST routes' parameters; InvalidSpec (INVALID_ARGUMENT) naming each bad one."""
    values = {name: getattr(request, name) for name in model.model_fields}
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise invalid_spec(exc.errors(), values) from None


async def call(
    context: grpc.aio.ServicerContext, settings: Settings, work: Callable[[Session], T]
) -> T:
    """Run `work` in a session in a worker thread: commit and return its result, or end the
    call with the error's gRPC status. `work` converts rows to messages itself, in the session."""

    def in_session() -> T:
        with session_scope(settings.resolved_database_url) as session:
            return work(session)

    try:
        return await asyncio.to_thread(in_session)
    except ServiceError as exc:
        await abort(context, exc)
    except DataError as exc:
        await abort(context, unstorable(exc))
    except Exception:
        log.exception("unhandled error in a gRPC call")
        await context.abort(grpc.StatusCode.INTERNAL, "internal server error")
    raise AssertionError("unreachable: abort raises")


async def abort(context: grpc.aio.ServicerContext, exc: ServiceError) -> None:
    _, code, status = classify(exc)
    context.set_trailing_metadata(
        ((ERROR_CODE_KEY, code), (ERROR_DETAILS_KEY, json.dumps(exc.details, default=str)))
    )
    await context.abort(status, exc.message)
