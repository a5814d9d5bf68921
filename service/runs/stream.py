"""A run's events as Server-Sent Events: each event once, in order, as it is recorded.

Every message carries the event's id, so a client that reconnects with `Last-Event-ID`
continues after the last one it saw. The stream ends after the run's final event; a comment
line goes out every KEEPALIVE_S so that proxies keep an idle stream open.
"""

import asyncio
import json
import time
from collections.abc import AsyncIterator

from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select

from service.config import Settings
from service.db import session_scope
from service.models import Run, RunEvent
from service.runs.schemas import EventRead
from service.runs.service import TERMINAL

POLL_S = 0.5
KEEPALIVE_S = 15.0
BATCH = 500


def _poll(settings: Settings, run_id: str, after: int) -> tuple[list[EventRead], bool]:
    """The events after `after` (up to BATCH) and whether the run has ended."""
    with session_scope(settings.resolved_database_url) as session:
        # Status first: the final event commits together with the final status, so once the
        # status reads as ended, the events read next include the last one.
        status = session.scalar(select(Run.status).where(Run.id == run_id))
        rows = session.scalars(select(RunEvent).where(RunEvent.run_id == run_id,
                                                      RunEvent.id > after)
                               .order_by(RunEvent.id).limit(BATCH)).all()
        return [EventRead.model_validate(r) for r in rows], status in TERMINAL


def sse_message(event: EventRead) -> str:
    data = json.dumps(event.model_dump(mode="json"))
    return f"id: {event.id}\nevent: {event.type}\ndata: {data}\n\n"


async def event_stream(settings: Settings, run_id: str, after: int,
                       disconnected) -> AsyncIterator[str]:
    """`disconnected`: an awaitable callable, true once the client has gone."""
    last_sent = time.monotonic()
    while not await disconnected():
        events, ended = await run_in_threadpool(_poll, settings, run_id, after)
        for event in events:
            yield sse_message(event)
            after = event.id
        if events:
            last_sent = time.monotonic()
        elif ended:  # nothing after the run's last event
            return
        elif time.monotonic() - last_sent > KEEPALIVE_S:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        if len(events) < BATCH:
            await asyncio.sleep(POLL_S)
