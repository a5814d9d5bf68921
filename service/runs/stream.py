"""Following a run as it happens: its state, events and step metrics, each sent once, in order.

One poll loop feeds both live APIs: Server-Sent Events (GET /v1/runs/{id}/events/stream) and
gRPC's Runs.WatchRun. A follower resumes from an event id and a step, so a client that
reconnects (SSE's `Last-Event-ID`) continues where it stopped. Following ends after the run's
final event.
"""

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select

from service.config import Settings
from service.contract.states import TERMINAL
from service.db import session_scope
from service.metrics.schemas import StepMetrics
from service.metrics.service import step_metrics
from service.models import Run, RunEvent
from service.runs.schemas import EventRead, RunRead

POLL_S = 0.5
KEEPALIVE_S = 15.0
BATCH = 500  # events, or steps of metrics, per poll


@dataclass
class Poll:
    run: RunRead
    events: list[EventRead] = field(default_factory=list)
    metrics: list[StepMetrics] = field(default_factory=list)

    @property
    def full(self) -> bool:
        """More may be waiting: poll again at once."""
        return len(self.events) == BATCH or len(self.metrics) == BATCH


def poll(settings: Settings, run_id: str, after_event: int, since_step: int | None) -> Poll:
    """The run, its events after `after_event` and (unless since_step is None) the metrics of
    the steps after `since_step` that the run has finished."""
    with session_scope(settings.resolved_database_url) as session:
        # The run first: a step's metrics commit together with the run's step, and the final
        # event with the final status, so what is read next is complete up to what it says.
        run = RunRead.model_validate(session.get(Run, run_id))
        events = session.scalars(
            select(RunEvent)
            .where(RunEvent.run_id == run_id, RunEvent.id > after_event)
            .order_by(RunEvent.id)
            .limit(BATCH)
        ).all()
        out = Poll(run, [EventRead.model_validate(e) for e in events])
        if since_step is not None:
            out.metrics = step_metrics(
                session, run_id, since_step, min(run.step, since_step + BATCH)
            )
        return out


Update = RunRead | EventRead | StepMetrics | None


async def follow(
    settings: Settings,
    run_id: str,
    after_event: int,
    since_step: int | None,
    gone: Callable[[], Awaitable[bool]],
) -> AsyncIterator[Update]:
    """Yields the run whenever its status or step changes (first at once), then each new event
    and, unless since_step is None, each finished step's metrics; None after KEEPALIVE_S of
    silence. Returns once the run has ended and everything up to its end was yielded, or when
    `gone()` says the client left. The caller has checked that the run is the client's."""
    shown, last_sent = None, time.monotonic()
    while not await gone():
        update = await run_in_threadpool(poll, settings, run_id, after_event, since_step)
        state = (update.run.status, update.run.step)
        news: list[Update] = [update.run] if state != shown else []
        news += update.events + update.metrics
        for item in news:
            yield item
        shown = state
        after_event = update.events[-1].id if update.events else after_event
        if update.metrics:
            since_step = update.metrics[-1].step
        if news:
            last_sent = time.monotonic()
        elif update.run.status in TERMINAL:
            return
        elif time.monotonic() - last_sent > KEEPALIVE_S:
            yield None
            last_sent = time.monotonic()
        if not update.full:
            await asyncio.sleep(POLL_S)


def sse_message(item: Update) -> str:
    """An event carries its id (what Last-Event-ID resumes from); state and metrics don't."""
    if item is None:
        return ": keep-alive\n\n"
    data = json.dumps(item.model_dump(mode="json"))
    if isinstance(item, EventRead):
        return f"id: {item.id}\nevent: {item.type}\ndata: {data}\n\n"
    kind = "run" if isinstance(item, RunRead) else "metrics"
    return f"event: {kind}\ndata: {data}\n\n"


async def event_stream(
    settings: Settings,
    run_id: str,
    after: int,
    since_step: int | None,
    disconnected: Callable[[], Awaitable[bool]],
) -> AsyncIterator[str]:
    """SSE: the run's events; with since_step given, also its state and step metrics."""
    async for item in follow(settings, run_id, after, since_step, disconnected):
        if since_step is None and isinstance(item, RunRead):
            continue
        yield sse_message(item)
