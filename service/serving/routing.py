"""Which inference worker serves a model, and the HTTP client that reaches it (one per API
process, on app.state).

The control calls to workers go through httpx; requests are relayed to the vLLM servers through
aiohttp, whose client reads a streamed answer's chunks for a fraction of httpx's CPU time.

Workers report themselves in `inference_workers` (workers/serving/worker.py). A request for a
model goes to a worker that holds it, else to the one with the most memory free, which loads it
(the request waits). The answer, the vLLM server's address and the version it holds, is kept
for ROUTE_TTL_S: after that, or when the model's weights are newer than the version held (a run
that published), or when the server cannot be reached, the worker is asked again, which also
keeps the model recently used there.
"""

import asyncio
import time
from dataclasses import dataclass

import aiohttp
import httpx
from starlette.concurrency import run_in_threadpool

from service.config import Settings
from service.contract.serving import (
    NO_WORKER,
    EnsureModel,
    Held,
    LiveWorker,
    by_preference,
    ensure_outcome,
)
from service.db import session_scope
from service.errors import Gone, ServiceUnavailable, WorkerFailed
from service.models.inference_worker import live_workers
from service.serving.models import ServedModel

ROUTE_TTL_S = 5.0
# vLLM's server (uvicorn) closes a connection idle for 5 s: one idle longer is not reused.
RELAY_KEEPALIVE_S = 4.0


@dataclass(frozen=True)
class Route:
    url: str  # the vLLM server's
    version: int
    until: float  # monotonic


def _live_workers(settings: Settings) -> list[LiveWorker]:
    with session_scope(settings.resolved_database_url) as session:
        return live_workers(session, settings.serve_stale_s)


class Router:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.headers = {"Authorization": f"Bearer {settings.serve_token}"}
        # Generation may take minutes; connecting may not.
        self.client = httpx.AsyncClient(
            headers=self.headers,
            timeout=httpx.Timeout(settings.serve_load_timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
        )
        self.routes: dict[str, Route] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self._relay: aiohttp.ClientSession | None = None

    def relay(self) -> aiohttp.ClientSession:
        """The client that relays requests to vLLM servers, made on first use (it belongs to
        the event loop). It asks for no compression and passes answers on as they come."""
        if self._relay is None:
            self._relay = aiohttp.ClientSession(
                headers={**self.headers, "Accept-Encoding": "identity"},
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=10.0, sock_read=self.settings.serve_load_timeout_s
                ),
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=RELAY_KEEPALIVE_S),
                auto_decompress=False,
            )
        return self._relay

    async def close(self) -> None:
        await self.client.aclose()
        if self._relay is not None:
            await self._relay.close()

    def forget(self, name: str) -> None:
        self.routes.pop(name, None)

    async def route(self, model: ServedModel) -> Route:
        if (route := self._cached(model)) is not None:
            return route
        lock = self.locks.setdefault(model.name, asyncio.Lock())
        async with lock:  # one ask per model at a time; the others take its answer
            if (route := self._cached(model)) is not None:
                return route
            route = await self._ask(model)
            self.routes[model.name] = route
            return route

    def _cached(self, model: ServedModel) -> Route | None:
        route = self.routes.get(model.name)
        if route and route.version >= model.version and route.until > time.monotonic():
            return route
        return None

    async def _ask(self, model: ServedModel) -> Route:
        workers = await run_in_threadpool(_live_workers, self.settings)
        if not workers:
            raise ServiceUnavailable(NO_WORKER)
        body = EnsureModel(model=model.name, path=model.path, version=model.version)
        failure = NO_WORKER
        for worker in by_preference(workers, model.name):
            try:
                answer = await self.client.post(f"{worker.url}/models", json=body.model_dump())
            except httpx.HTTPError as exc:  # gone since its last report: try the next
                failure = f"the inference worker at {worker.url} did not answer ({exc!r})"
                continue
            outcome = ensure_outcome(answer.status_code, _json(answer))
            if isinstance(outcome, Held):
                return Route(outcome.url, outcome.version, time.monotonic() + ROUTE_TTL_S)
            if outcome.kind == "gone":
                raise Gone(outcome.message)
            if outcome.kind == "broken":
                raise WorkerFailed(outcome.message)
            failure = outcome.message  # no room there: another worker may have some
        raise ServiceUnavailable(failure)


def _json(answer: httpx.Response) -> object:
    try:
        return answer.json()
    except ValueError:
        return None
