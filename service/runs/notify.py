"""Run notifications: a run whose spec has a `notify_url` POSTs one signed `run.succeeded`,
`run.failed` or `run.cancelled` event there when it ends.

The outbox is the run row itself. A run created with a notify_url starts with notify_state
"pending"; it becomes due once the run is terminal, whichever way it got there (the worker, the
watchdog, a cancel in the API), so no transition has to remember to notify. Each API process
makes a pass every settings.notify_interval_s (service/background.py) that sends what is due:

- claim: one conditional UPDATE moves `notify_due_at` past the send's time limit, so of the
  replicas that see the run due, one sends; a sender that dies mid-send leaves the run due
  again when that claim expires, and another sends it (at least once; receivers de-duplicate by
  the `GVPO-Event-Id` header).
- send: signed like reward webhooks, the address re-checked, no redirects followed, the answer
  read up to a cap, within `notify_timeout_s`.
- record: a 2xx is `delivered`; a network error, 5xx or 429 is tried again after
  notify_backoff_s * 2^(tries-1) (capped, or Retry-After if longer) until notify_max_attempts;
  any other answer, or the last try, is `failed`. The outcome is written only while the claim
  is still this sender's, with a `notify.delivered` or `notify.failed` run event.
"""

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import or_, select, update

from service.config import Settings
from service.contract.events import ENDED, EventLevel, EventType
from service.contract.outbound import OutboundClient, Refused, Transient, post_signed
from service.contract.states import TERMINAL, NotifyState, RunStatus
from service.contract.webhooks import RunNotification, RunSummary
from service.db import session_scope
from service.models import Run
from service.models.base import utcnow
from service.models.run_event import add_event

log = logging.getLogger(__name__)

EVENT_ID_HEADER = "GVPO-Event-Id"
BACKOFF_CAP_S = 300.0
MAX_RESPONSE_BYTES = 64 * 1024  # only a snippet of the answer is ever reported
BATCH, SENDERS = 50, 4  # runs looked at per pass; sends at once (a slow receiver holds one)


@dataclass(frozen=True)
class Claim:
    run_id: str
    until: datetime  # our claim: the outcome is written only if notify_due_at still says this
    attempts: int  # tries before this one
    url: str
    secret: str
    event_id: str
    body: bytes


@dataclass(frozen=True)
class Outcome:
    kind: Literal["ok", "retry", "final"]  # 2xx; worth another try; given up
    answer: str
    status: int | None = None
    retry_after: float | None = None


def notification_id(run_id: str) -> str:
    return f"ntf_{run_id.removeprefix('run_')}"


def _due(now: datetime):
    return (
        Run.status.in_(TERMINAL),
        Run.notify_state == NotifyState.PENDING,
        or_(Run.notify_due_at.is_(None), Run.notify_due_at <= now),
    )


def due_runs(settings: Settings, limit: int = BATCH) -> list[str]:
    with session_scope(settings.resolved_database_url) as session:
        return list(
            session.scalars(select(Run.id).where(*_due(utcnow())).order_by(Run.id).limit(limit))
        )


def claim(settings: Settings, run_id: str) -> Claim | None:
    """Take the run's notification for one send, or None if it is not due (or another took it)."""
    now = utcnow()
    # Past the send's own limit (connect, write and read each have it) and the outcome's write.
    until = now + timedelta(seconds=3 * settings.notify_timeout_s + 30)
    with session_scope(settings.resolved_database_url) as session:
        taken = (
            session.execute(
                update(Run)
                .where(Run.id == run_id, *_due(now))
                .values(notify_due_at=until)
                .execution_options(synchronize_session=False)
            ).rowcount
            == 1
        )
        if not taken:
            return None
        run = session.get(Run, run_id)
        event_id = notification_id(run.id)
        body = RunNotification(
            type=ENDED[RunStatus(run.status)],
            id=event_id,
            run_id=run.id,
            created_at=run.finished_at or run.created_at,
            run=RunSummary.model_validate(run),
        )
        return Claim(
            run.id,
            until,
            run.notify_attempts,
            run.spec["notify_url"],
            settings.sealer.open(run.webhook_secret_encrypted),
            event_id,
            body.model_dump_json().encode(),
        )


def send(settings: Settings, c: Claim) -> Outcome:
    """One signed POST of the claimed notification."""
    with OutboundClient(settings.webhook_allow_private, settings.notify_timeout_s) as client:
        try:
            answer = post_signed(
                client,
                c.url,
                c.body,
                c.secret,
                {EVENT_ID_HEADER: c.event_id},
                MAX_RESPONSE_BYTES,
                settings.notify_timeout_s,
            )
        except Refused as exc:
            return Outcome("retry", f"may not be called: {exc}")
        except Transient as exc:
            return Outcome("retry", exc.answer, None, exc.retry_after)
    if 200 <= answer.status < 300:
        return Outcome("ok", answer.describe(), answer.status)
    if answer.retryable:
        return Outcome("retry", answer.describe(), answer.status, answer.retry_after)
    note = " (redirects are not followed)" if 300 <= answer.status < 400 else ""
    return Outcome("final", answer.describe() + note, answer.status)


def backoff_s(settings: Settings, tries: int, retry_after: float | None = None) -> float:
    """The wait after the `tries`-th failed try: 1, 2, 4, ... x notify_backoff_s, capped."""
    delay = min(BACKOFF_CAP_S, settings.notify_backoff_s * 2 ** (tries - 1))
    return max(delay, retry_after or 0.0)


def record(settings: Settings, c: Claim, outcome: Outcome) -> NotifyState | None:
    """Write the outcome of a send; the new notify_state, or None if our claim was lost (it
    expired and another sender took the run over: its outcome is the one that counts)."""
    tries = c.attempts + 1
    state, due = NotifyState.FAILED, None
    if outcome.kind == "ok":
        state = NotifyState.DELIVERED
    elif outcome.kind == "retry" and tries < settings.notify_max_attempts:
        state = NotifyState.PENDING
        due = utcnow() + timedelta(seconds=backoff_s(settings, tries, outcome.retry_after))
    with session_scope(settings.resolved_database_url) as session:
        mine = (
            session.execute(
                update(Run)
                .where(
                    Run.id == c.run_id,
                    Run.notify_state == NotifyState.PENDING,
                    Run.notify_due_at == c.until,
                )
                .values(notify_state=state, notify_attempts=tries, notify_due_at=due)
                .execution_options(synchronize_session=False)
            ).rowcount
            == 1
        )
        if not mine:
            return None
        data = {"url": c.url, "status": outcome.status, "attempts": tries, "event_id": c.event_id}
        if state == NotifyState.DELIVERED:
            add_event(
                session,
                c.run_id,
                EventType.NOTIFY_DELIVERED,
                f"run notification delivered to {c.url} (HTTP {outcome.status}, try {tries})",
                data=data,
            )
        elif state == NotifyState.FAILED:
            add_event(
                session,
                c.run_id,
                EventType.NOTIFY_FAILED,
                f"run notification to {c.url} failed after {tries} "
                f"{'try' if tries == 1 else 'tries'}; last answer: {outcome.answer}",
                EventLevel.WARNING,
                {**data, "answer": outcome.answer},
            )
    return state


def deliver(settings: Settings, run_id: str) -> NotifyState | None:
    """Claim, send and record one run's notification; its new state, or None if not ours."""
    c = claim(settings, run_id)
    return None if c is None else record(settings, c, send(settings, c))


def deliver_due(settings: Settings) -> dict[str, str]:
    """One pass over the due notifications; {run id: new state} for those this call handled."""
    ids = due_runs(settings)
    if len(ids) <= 1:
        states = [deliver(settings, run_id) for run_id in ids]
    else:
        with ThreadPoolExecutor(min(SENDERS, len(ids)), thread_name_prefix="gvpo-notify") as pool:
            states = list(pool.map(lambda run_id: deliver(settings, run_id), ids))
    return {run_id: state for run_id, state in zip(ids, states, strict=True) if state is not None}
