"""create_app(): routers and error handlers. Engines are built lazily per process, never at
import."""

import contextlib
import functools
import gc
import logging
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import dashboard, dispatch, installed_version, telemetry
from service.background import Every
from service.checkpoints.routes import router as checkpoints_router
from service.config import Settings, get_settings
from service.db import get_sessionmaker, open_loop_pool
from service.diagnostics.routes import router as diagnostics_router
from service.edge import Edge
from service.errors import ERROR_RESPONSES, ServiceError, classify, invalid_spec, unstorable
from service.files.routes import router as files_router
from service.fine_tuning.routes import router as fine_tuning_router
from service.graders.routes import router as graders_router
from service.grpc_server import GrpcServer
from service.health import router as health_router
from service.metrics.routes import router as metrics_router
from service.offpolicy.routes import router as offpolicy_router
from service.rescores.routes import router as rescores_router
from service.rewards.routes import router as rewards_router
from service.runs.admission import schedule
from service.runs.notify import deliver_due
from service.runs.reaper import reap
from service.runs.routes import router as runs_router
from service.runs.routes import states_router
from service.serving.lookups import Lookups
from service.serving.metering import METER_FLUSH_S, Meter
from service.serving.routes import router as serving_router
from service.serving.routing import Router
from service.usage.routes import router as usage_router

log = logging.getLogger(__name__)


class UnsafeSettings(RuntimeError):
    """The settings would run a cluster on default secrets."""


def error_body(code: str, message: str, details: dict | None = None) -> dict:
    return {"error": {"code": code, "message": message, "details": details or {}}}


async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
    status, code, _ = classify(exc)
    return JSONResponse(error_body(code, exc.message, exc.details), status_code=status)


async def _data_error(request: Request, exc: DataError) -> JSONResponse:
    return await _service_error(request, unstorable(exc))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # The route's body type: an unknown field of the body is answered with the closest known one.
    body_field = getattr(request.scope.get("route"), "body_field", None)
    model = body_field.field_info.annotation if body_field else None
    error = invalid_spec(list(exc.errors()), exc.body, model)
    return JSONResponse(
        error_body("invalid_request", error.message, error.details), status_code=422
    )


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
        exc.status_code, "http_error"
    )
    message = str(exc.detail)
    if exc.status_code in (404, 405):  # routing errors: say which route was asked for
        message = f"{message}: no route {request.method} {request.url.path}"
    return JSONResponse(error_body(code, message), status_code=exc.status_code)


async def _unexpected_error(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error")
    return JSONResponse(error_body("internal_error", "internal server error"), status_code=500)


@asynccontextmanager
async def _lifespan(app: FastAPI):
    settings = app.state.settings
    # What requests share and would otherwise build on first use, built once before the first
    # request: the database engine (with its dialect's modules) and the broker's publisher. On
    # PostgreSQL, the hot routes' pool on this lifespan's event loop (deps.answer_steps).
    get_sessionmaker(settings.resolved_database_url)
    app.state.loop_pool = await open_loop_pool(settings.resolved_database_url)
    dispatch.prepare(settings)
    # Background passes, each on a thread and an interval of its own (0 turns it off).
    stopped = threading.Event()
    threads = [
        Every(name, interval, functools.partial(work, settings), stopped)
        for name, interval, work in (
            ("reaper", settings.reaper_interval_s, reap),
            ("scheduler", settings.schedule_interval_s, schedule),
            ("notifier", settings.notify_interval_s, deliver_due),
        )
        if interval > 0
    ]
    url = settings.resolved_database_url
    threads.append(Every("meter", METER_FLUSH_S, lambda: app.state.meter.flush(url), stopped))
    grpc_server = GrpcServer(settings, app.state.prometheus) if settings.grpc_port else None
    if grpc_server:
        await grpc_server.start()
    for thread in threads:
        thread.start()
    # Everything built so far lives as long as the process: out of the collector's way, a full
    # collection (which a response of thousands of points triggers) scans only what requests
    # made. Before this, one request in ten waited ~100 ms for it (bench/metrics_scale.py).
    gc.freeze()
    try:
        yield
    finally:
        stopped.set()
        if grpc_server:
            await grpc_server.stop()
        await app.state.serving.close()
        with contextlib.suppress(Exception):  # the database gone: those counts are lost
            app.state.meter.flush(url)
        if app.state.loop_pool is not None:
            await app.state.loop_pool.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API. Outside the embedded stack it refuses to exist with default secrets."""
    settings = settings or get_settings()
    if problems := settings.unsafe_secrets():
        raise UnsafeSettings(
            "refusing to serve a cluster with default secrets:\n- " + "\n- ".join(problems)
        )
    app = FastAPI(
        title="gvpo-service",
        version=installed_version(),
        summary="GVPO post-training as a service",
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.serving = Router(settings)  # inference: the routes to the models' servers
    app.state.lookups = Lookups(settings)  # inference: keys and models seen in the last seconds
    app.state.meter = Meter()  # inference: the usage relayed, added to the database every 2 s
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(DataError, _data_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    app.include_router(health_router)  # /readyz's 503 is its own report, not an error
    for router in (
        rewards_router,  # first: routes are matched in order, and callbacks are the most frequent
        runs_router,
        files_router,
        fine_tuning_router,
        metrics_router,
        checkpoints_router,
        diagnostics_router,
        graders_router,
        offpolicy_router,
        rescores_router,
        states_router,
        serving_router,
        usage_router,
        telemetry.router,
    ):
        app.include_router(router, responses=ERROR_RESPONSES)
    telemetry.install(app, app.state.settings)
    dashboard.install(app)
    app.add_middleware(Edge, settings=settings)  # outermost: before any route or other middleware
    return app
