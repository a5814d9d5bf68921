"""Metric values, one per (run, name, step), and their rollups: per series, the count, the span
and the extreme points of every bucket of FANOUT**level steps, for levels 1..LEVELS.

A 100k-step run with 30 series holds 3M values; a chart of 1,000 points per series reads the
finest level with at most 500 buckets in its range (two points each: the bucket's minimum and
maximum) instead. The worker refreshes the buckets a step touches when it records the step
(refresh_rollups): each level's bucket is merged from the FANOUT below it, so a replayed step
that changes a value leaves no stale extreme behind.
"""

from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy import Double, ForeignKey, Integer, String, bindparam, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from service.models.base import Base, upsert

FANOUT = 4
LEVELS = 9  # the coarsest bucket holds 4**9 = 262,144 steps


class Metric(Base):
    """One value per (run, name, step): a replayed step overwrites instead of duplicating."""

    __tablename__ = "metrics"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[float] = mapped_column(Double)
    # Unix seconds when it was recorded (None: recorded before times were kept)
    time: Mapped[float | None] = mapped_column(Double, nullable=True)


class MetricRollup(Base):
    """Bucket `bucket` (steps bucket*FANOUT**level ...) of one series at one level."""

    __tablename__ = "metric_rollups"

    # key order: a level's rows of a run are one range of the index (the reads' and writes')
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    level: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    bucket: Mapped[int] = mapped_column(Integer, primary_key=True)
    count: Mapped[int] = mapped_column(Integer)
    first_step: Mapped[int] = mapped_column(Integer)
    last_step: Mapped[int] = mapped_column(Integer)
    min_step: Mapped[int] = mapped_column(Integer)
    min_value: Mapped[float] = mapped_column(Double)
    min_time: Mapped[float | None] = mapped_column(Double, nullable=True)
    max_step: Mapped[int] = mapped_column(Integer)
    max_value: Mapped[float] = mapped_column(Double)
    max_time: Mapped[float | None] = mapped_column(Double, nullable=True)


ROLLUP_FIELDS = [c.name for c in MetricRollup.__table__.columns]
ROLLUP_KEYS = ["run_id", "level", "name", "bucket"]
BUCKET_FIELDS = ROLLUP_FIELDS[len(ROLLUP_KEYS) :]  # Bucket's, in its order
BUCKET_COLUMNS = [getattr(MetricRollup, f) for f in BUCKET_FIELDS]


@dataclass(frozen=True)
class Bucket:
    """What a rollup row holds, merged from points or from the buckets a level below."""

    count: int
    first_step: int
    last_step: int
    min_step: int
    min_value: float
    min_time: float | None
    max_step: int
    max_value: float
    max_time: float | None

    @classmethod
    def point(cls, step: int, value: float, time: float | None) -> "Bucket":
        return cls(1, step, step, step, value, time, step, value, time)

    @classmethod
    def merge(cls, parts: list["Bucket"]) -> "Bucket":
        low = min(parts, key=lambda b: (b.min_value, b.min_step))
        high = max(parts, key=lambda b: (b.max_value, -b.max_step))
        return cls(
            sum(b.count for b in parts),
            min(b.first_step for b in parts),
            max(b.last_step for b in parts),
            low.min_step,
            low.min_value,
            low.min_time,
            high.max_step,
            high.max_value,
            high.max_time,
        )


def bucket_of(step: int, level: int) -> int:
    return step // FANOUT**level


def _row(run_id: str, name: str, level: int, bucket: int, b: Bucket) -> dict:
    return {"run_id": run_id, "name": name, "level": level, "bucket": bucket, **b.__dict__}


def _write(session: Session, rows: list[dict]) -> None:
    """In key order: concurrent writers of one step (a stale worker and its replacement) lock
    the rows in the same order, so they wait for each other instead of deadlocking."""
    rows.sort(key=lambda r: (r["level"], r["name"], r["bucket"]))
    upsert(session, MetricRollup, rows, ROLLUP_KEYS, BUCKET_FIELDS)


# Built once: each refresh only binds values (SQLAlchemy caches their compiled form).
_POINTS = select(Metric.name, Metric.step, Metric.value, Metric.time).where(
    Metric.run_id == bindparam("run"),
    Metric.name.in_(bindparam("names", expanding=True)),
    Metric.step.between(bindparam("lo"), bindparam("hi")),
)
_CHILDREN = select(MetricRollup.name, *BUCKET_COLUMNS).where(
    MetricRollup.run_id == bindparam("run"),
    MetricRollup.level == bindparam("level"),
    MetricRollup.name.in_(bindparam("names", expanding=True)),
    MetricRollup.bucket.between(bindparam("lo"), bindparam("hi")),
)


def refresh_rollups(session: Session, run_id: str, names: list[str], steps: set[int]) -> None:
    """Recompute every level's buckets of `names` that hold `steps` (just written) from the
    level below."""
    connection = session.connection()
    for level in range(1, LEVELS + 1):
        children: dict[tuple[str, int], list[Bucket]] = defaultdict(list)
        for first in sorted({bucket_of(s, level) for s in steps}):
            # the FANOUT buckets (at level 1: steps) below this one
            lo, hi = first * FANOUT, first * FANOUT + FANOUT - 1
            bounds = {"run": run_id, "names": names, "lo": lo, "hi": hi}
            if level == 1:
                for name, step, value, time in connection.execute(_POINTS, bounds):
                    children[name, first].append(Bucket.point(step, value, time))
            else:
                for name, *fields in connection.execute(_CHILDREN, {**bounds, "level": level - 1}):
                    children[name, first].append(Bucket(*fields))
        _write(
            session,
            [
                _row(run_id, name, level, bucket, Bucket.merge(parts))
                for (name, bucket), parts in children.items()
            ],
        )


def rebuild_rollups(session: Session, run_id: str) -> None:
    """Every level of a run's rollups from its metric values, a series at a time (for values
    written before rollups existed, or loaded in bulk)."""
    names = session.scalars(select(Metric.name).where(Metric.run_id == run_id).distinct()).all()
    for name in names:
        points = session.execute(
            select(Metric.step, Metric.value, Metric.time).where(
                Metric.run_id == run_id, Metric.name == name
            )
        )
        below = {step: Bucket.point(step, value, time) for step, value, time in points}
        for level in range(1, LEVELS + 1):
            parts: dict[int, list[Bucket]] = defaultdict(list)
            for index, b in below.items():
                parts[index // FANOUT].append(b)
            below = {index: Bucket.merge(bs) for index, bs in parts.items()}
            _write(session, [_row(run_id, name, level, i, b) for i, b in below.items()])
