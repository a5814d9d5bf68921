"""Prometheus `/metrics` for operators.

Two sources:
- this API process's own HTTP traffic (request counts and latencies by route template), kept in
  a registry per app;
- the state of all runs, read from the database at scrape time. Workers are separate processes
  on other machines; what they do lands in the database anyway (leases, step timings, reward
  retries), so any API replica can report it without a push gateway or shared files.

Per-run series cover running runs only, which keeps their number bounded.
"""

import asyncio
import hmac
import ipaddress
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Annotated

import grpc
from fastapi import APIRouter, FastAPI, Header, Request, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy import func, select

from service.config import Settings
from service.contract.events import EventType
from service.contract.states import RunStatus
from service.contract.tasks import queue_of
from service.db import session_scope
from service.errors import Unauthorized
from service.models import Metric, Run, RunEvent
from service.models.base import utcnow

STEP_PHASES = ("weight_sync", "rollout", "reward", "learn")

router = APIRouter(tags=["health"])


class RunStateCollector:
    """Gauges computed from the database on each scrape."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self):
        with session_scope(self.settings.resolved_database_url) as session:
            by_state = dict(
                session.execute(select(Run.status, func.count()).group_by(Run.status)).all()
            )
            queued = session.execute(
                select(Run.spec, Run.id).where(Run.status == RunStatus.QUEUED)
            ).all()
            running = session.execute(
                select(Run.id, Run.lease_owner, Run.lease_expires_at).where(
                    Run.status == RunStatus.RUNNING
                )
            ).all()
            ids = [r.id for r in running]
            latest = self._latest_step_times(session, ids)
            retries = dict(
                session.execute(
                    select(RunEvent.run_id, func.count())
                    .where(RunEvent.run_id.in_(ids), RunEvent.type == EventType.REWARD_RETRY)
                    .group_by(RunEvent.run_id)
                ).all()
            )
        yield self._runs_by_state(by_state)
        yield self._queue_depth(queued)
        yield self._heartbeats(running)
        yield from self._step_and_reward(latest, retries, ids)

    @staticmethod
    def _runs_by_state(by_state: dict) -> GaugeMetricFamily:
        g = GaugeMetricFamily("gvpo_runs", "runs by state", labels=["state"])
        for state in RunStatus:
            g.add_metric([state], by_state.get(state, 0))
        return g

    @staticmethod
    def _queue_depth(queued) -> GaugeMetricFamily:
        depth: dict[str, int] = {}
        for spec, _ in queued:
            queue = queue_of(spec)
            depth[queue] = depth.get(queue, 0) + 1
        g = GaugeMetricFamily(
            "gvpo_queue_depth", "runs waiting for a worker, by Celery queue", labels=["queue"]
        )
        for queue, n in sorted(depth.items()):
            g.add_metric([queue], n)
        return g

    def _heartbeats(self, running) -> GaugeMetricFamily:
        g = GaugeMetricFamily(
            "gvpo_worker_heartbeat_age_seconds",
            "seconds since the worker last renewed a running run's lease",
            labels=["run_id", "worker"],
        )
        lease = timedelta(seconds=self.settings.lease_seconds)
        now = utcnow()
        for run_id, owner, expires in running:
            if expires is not None:
                renewed = expires - lease
                g.add_metric([run_id, owner or ""], max((now - renewed).total_seconds(), 0))
        return g

    @staticmethod
    def _latest_step_times(session, ids: list[str]) -> dict[tuple[str, str], float]:
        names = [f"time/{p}_s" for p in STEP_PHASES]
        last = (
            select(Metric.run_id, func.max(Metric.step).label("step"))
            .where(Metric.run_id.in_(ids), Metric.name == "time/learn_s")
            .group_by(Metric.run_id)
            .subquery()
        )
        rows = session.execute(
            select(Metric.run_id, Metric.name, Metric.value)
            .join(last, (Metric.run_id == last.c.run_id) & (Metric.step == last.c.step))
            .where(Metric.name.in_(names))
        ).all()
        return {(run_id, name): value for run_id, name, value in rows}

    @staticmethod
    def _step_and_reward(latest: dict, retries: dict, ids: list[str]):
        step = GaugeMetricFamily(
            "gvpo_step_phase_seconds",
            "wall time of each phase of a running run's latest step",
            labels=["run_id", "phase"],
        )
        reward = GaugeMetricFamily(
            "gvpo_reward_seconds",
            "reward phase of a running run's latest step (webhook latency for webhook rewards)",
            labels=["run_id"],
        )
        failures = GaugeMetricFamily(
            "gvpo_reward_webhook_retries",
            "reward webhook calls retried or re-sent in a running run",
            labels=["run_id"],
        )
        for run_id in ids:
            for phase in STEP_PHASES:
                if (run_id, f"time/{phase}_s") in latest:
                    step.add_metric([run_id, phase], latest[(run_id, f"time/{phase}_s")])
            if (run_id, "time/reward_s") in latest:
                reward.add_metric([run_id], latest[(run_id, "time/reward_s")])
            failures.add_metric([run_id], retries.get(run_id, 0))
        return step, reward, failures


class _RequestMetrics:
    """Plain ASGI middleware (no BaseHTTPMiddleware: it would sit between a streaming response
    and its client). Latency is time to the response's first byte, so an event stream counts
    once, as its start."""

    def __init__(self, app, registry: CollectorRegistry) -> None:
        self.app = app
        self.requests = Counter(
            "gvpo_http_requests", "API requests", ["method", "route", "status"], registry=registry
        )
        self.latency = Histogram(
            "gvpo_http_request_duration_seconds",
            "API request latency (to the first byte)",
            ["method", "route"],
            registry=registry,
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, started = time.perf_counter(), False

        def record(status: int) -> None:
            # the router put the matched route in the scope: its template bounds the label
            route = getattr(scope.get("route"), "path", "unmatched")
            self.requests.labels(scope["method"], route, str(status)).inc()
            self.latency.labels(scope["method"], route).observe(time.perf_counter() - start)

        async def measured_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                record(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, measured_send)
        except Exception:  # answered as a 500 by the outermost error handler, past this one
            if not started:
                record(500)
            raise


class GrpcMetrics(grpc.aio.ServerInterceptor):
    """The gRPC API's calls, by method and status code; a stream's latency is its whole life."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "gvpo_grpc_requests", "gRPC API calls", ["method", "code"], registry=registry
        )
        self.latency = Histogram(
            "gvpo_grpc_request_duration_seconds",
            "gRPC API call latency (a stream: until it ends)",
            ["method"],
            registry=registry,
        )

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not (handler.unary_unary or handler.unary_stream):
            return handler  # client streams (reflection) go uncounted
        record = self._recorder(details.method)
        if handler.unary_unary:

            async def unary(request, context):
                with record(context):
                    return await handler.unary_unary(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer
            )

        async def stream(request, context):
            with record(context):
                async for item in handler.unary_stream(request, context):
                    yield item

        return grpc.unary_stream_rpc_method_handler(
            stream, handler.request_deserializer, handler.response_serializer
        )

    def _recorder(self, method: str):
        @contextmanager
        def record(context):
            start, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                yield
            except BaseException as exc:
                if context.cancelled() or isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
                    code = grpc.StatusCode.CANCELLED  # the client went away (a watch it stopped)
                else:  # an abort set the code; anything else is answered as UNKNOWN by grpc
                    code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            finally:
                if code == grpc.StatusCode.OK and context.cancelled():
                    code = grpc.StatusCode.CANCELLED  # a stream that saw its client leave
                name = code.name if isinstance(code, grpc.StatusCode) else str(code)
                self.requests.labels(method, name).inc()
                self.latency.labels(method).observe(time.perf_counter() - start)

        return record


def install(app: FastAPI, settings: Settings) -> None:
    """Request metrics and the run-state collector, in a registry of this app."""
    registry = CollectorRegistry()
    registry.register(RunStateCollector(settings))
    app.state.prometheus = registry
    app.add_middleware(_RequestMetrics, registry=registry)


@router.get("/metrics", include_in_schema=False)
def prometheus_metrics(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> Response:
    """For the operator only: it names every running run. With GVPO_METRICS_TOKEN set, the
    scraper sends it as a bearer token; unset, only a client on this machine may read it."""
    token = request.app.state.settings.metrics_token
    if token:  # an empty value (compose passes one through) is no token
        scheme, _, sent = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(sent.encode(), token.encode()):
            raise Unauthorized("GET /metrics needs the operator's metrics token (Bearer)")
    elif not _on_this_machine(request):
        raise Unauthorized(
            "GET /metrics is for the operator: set GVPO_METRICS_TOKEN and send it as a bearer "
            "token, or scrape from this machine"
        )
    return Response(generate_latest(request.app.state.prometheus), media_type=CONTENT_TYPE_LATEST)


def _on_this_machine(request: Request) -> bool:
    try:
        return request.client is not None and ipaddress.ip_address(request.client.host).is_loopback
    except ValueError:  # not an address (a test client's name)
        return False
