"""What an attempt of a run uses (service/models/usage.py), as the lead counts it: device time
from the claim on (its training processes' devices for as long as the attempt holds the run),
and the tokens, reward calls and environment calls of its steps. Written as the attempt's totals
per day (UTC), absolute, so a write repeated after a database outage counts once."""

import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db import session_scope
from service.models import Run, Usage
from service.models.base import upsert, utcnow
from workers.retrying import retrying

COUNTED = ("tokens_generated", "tokens_trained", "reward_calls", "environment_calls")
USAGE_KEYS = ["run_id", "attempt", "day"]
RESCORE_ATTEMPT = 0  # the run's rescores (service/models/usage.py); its own attempts are 1, 2, ...


@dataclass
class Spending:
    run_id: str
    project_id: str
    attempt: int
    device: str  # "gpu" or "cpu"
    devices: int
    since: datetime  # when the attempt's worker claimed the run
    counts: dict[date, Counter] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, now: datetime, **counts: int) -> None:
        """Count `counts` (COUNTED's names) on `now`'s day; from any thread."""
        with self.lock:
            self.counts.setdefault(now.date(), Counter()).update(counts)

    def take(self) -> dict[date, Counter]:
        """What was counted since the last take, per day (the counts start again from 0)."""
        with self.lock:
            counts, self.counts = self.counts, {}
        return counts

    def rows(self, now: datetime) -> list[dict]:
        """The attempt's usage rows up to `now`: one per day it has held the run."""
        rows, day = [], self.since.date()
        while day <= now.date():
            start = datetime.combine(day, time(), UTC)
            held = min(now, start + timedelta(days=1)) - max(self.since, start)
            with self.lock:
                counts = dict(self.counts.get(day, {}))
            rows.append(
                {
                    "run_id": self.run_id,
                    "attempt": self.attempt,
                    "day": day,
                    "project_id": self.project_id,
                    "device": self.device,
                    "device_seconds": max(held.total_seconds(), 0.0) * self.devices,
                    **{name: counts.get(name, 0) for name in COUNTED},
                }
            )
            day += timedelta(days=1)
        return rows


class Spends:
    """The usage half of RunRecorder (which sets settings, run_id, url and spending = None)."""

    spending: Spending | None

    @retrying
    def start_spending(self, device_type: str, devices: int) -> None:
        """Count the attempt's usage from its claim on: `devices` of `device_type` ("cuda"
        counts as GPUs, anything else as CPU processes)."""
        with session_scope(self.url) as session:
            run = session.get(Run, self.run_id)
            device = "gpu" if device_type == "cuda" else "cpu"
            since = run.claimed_at or utcnow()
            self.spending = Spending(
                self.run_id, run.project_id, run.attempts, device, devices, since
            )

    def spent(self, **counts: int) -> None:
        """Count `counts` (workers/spending.py COUNTED) in the attempt's usage."""
        if self.spending is not None:
            self.spending.add(utcnow(), **counts)

    def _write_spending(self, session: Session) -> None:
        """The usage rows, after the run's row is locked: every writer of both (the heartbeat,
        a step's record, the attempt's end) takes them in that order, or two of them deadlock
        on PostgreSQL (a step wrote these before its run row, a heartbeat the other way). FOR
        NO KEY UPDATE, the lock an UPDATE of the row takes: FOR UPDATE would also block the
        key-share lock that writing a usage row takes on its run (the foreign key)."""
        if self.spending is not None:
            run = select(Run.id).where(Run.id == self.run_id)
            session.execute(run.with_for_update(key_share=True))
            rows = self.spending.rows(utcnow())
            upsert(session, Usage, rows, USAGE_KEYS, ["device_seconds", *COUNTED])
