"""Metric values, one per (run, name, step), and their rollups: per series, the count, the span
and the extreme points of every bucket of FANOUT**level steps, for levels 1..LEVELS.

A 100k-step run with 30 series holds 3M values; a chart of 1,000 points per series reads the
finest level with at most 500 buckets in its range (two points each: the bucket's minimum and
maximum) instead. The worker refreshes the buckets a step touches when it records the step
(refresh_rollups): each level's bucket is merged from the FANOUT below it, so a replayed step
that changes a value leaves no stale extreme behind.

Charts read the extremes from metric_pages, a copy of them packed PAGE buckets to a row: a
100k-step chart of 20 series reads 500 rows there instead of 7,820 rollups, which cost more to
fetch and turn into points than everything else the request does.
"""

import hashlib
import math
import sys
from array import array
from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy import (
    Double,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    bindparam,
    func,
    select,
    union_all,
)
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


# Buckets a page: 640 bytes. A step rewrites a page at each level of each series it touches;
# against 32 buckets, the writes halve and a chart's read costs the same.
PAGE = 16


class MetricPage(Base):
    """The extremes of buckets PAGE*page ... PAGE*page+PAGE-1 of one series at one level, in
    step order: bucket b's earlier extreme at index 2*(b % PAGE) of each array, its later one
    next to it. Little-endian arrays: steps int32 (-1: no point there, as for the later extreme
    of a bucket whose lowest and highest point are the same), values and times float64 (NaN:
    no time recorded)."""

    __tablename__ = "metric_pages"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    level: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    page: Mapped[int] = mapped_column(Integer, primary_key=True)
    step_data: Mapped[bytes] = mapped_column(LargeBinary)
    value_data: Mapped[bytes] = mapped_column(LargeBinary)
    time_data: Mapped[bytes] = mapped_column(LargeBinary)


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


def page_of(bucket: int) -> int:
    return bucket // PAGE


def unpack(typecode: str, data: bytes) -> array:
    """A page array's numbers ("i": steps, "d": values or times; of one page or of several
    joined)."""
    numbers = array(typecode, data)
    if sys.byteorder == "big":
        numbers.byteswap()
    return numbers


def _pack(numbers: array) -> bytes:
    if sys.byteorder == "big":
        numbers = array(numbers.typecode, numbers)
        numbers.byteswap()
    return numbers.tobytes()


PAGE_COLUMNS = {"step_data": "i", "value_data": "d", "time_data": "d"}  # column: array type
_NOTHING = {"i": -1, "d": math.nan}
_EMPTY = [array(t, [_NOTHING[t]] * 2 * PAGE) for t in PAGE_COLUMNS.values()]  # no point


def _row(run_id: str, name: str, level: int, bucket: int, b: Bucket) -> dict:
    return {"run_id": run_id, "name": name, "level": level, "bucket": bucket, **b.__dict__}


def _write(session: Session, rows: list[dict]) -> None:
    """In key order, so that writers of one run's rollups at once (which on PostgreSQL take
    turns under lock_series) could not deadlock on them even without it."""
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


# The pages of `names` in range lo_L..hi_L at each level L (an empty range: lo_L > hi_L): one
# statement, each level's part a range of the key.
_PAGES = union_all(
    *(
        select(
            MetricPage.level,
            MetricPage.name,
            MetricPage.page,
            MetricPage.step_data,
            MetricPage.value_data,
            MetricPage.time_data,
        ).where(
            MetricPage.run_id == bindparam("run"),
            MetricPage.level == level,
            MetricPage.name.in_(bindparam("names", expanding=True)),
            MetricPage.page.between(bindparam(f"lo{level}"), bindparam(f"hi{level}")),
        )
        for level in range(1, LEVELS + 1)
    )
)
PAGE_KEYS = ["run_id", "level", "name", "page"]


def lock_series(session: Session, run_id: str) -> None:
    """Hold the run's metric writes until this transaction ends, on PostgreSQL (SQLite lets one
    writer in at a time anyway). Writers of one run at once (a stale worker and its
    replacement, an evaluation) would otherwise each merge a bucket from what the other had
    not committed yet, and the last to write would drop the other's points from the rollups
    and their pages. Take it before the transaction's first write, so that nothing it holds can
    be waited on by a holder of this lock."""
    if session.get_bind().dialect.name == "postgresql":
        digest = hashlib.blake2b(f"metrics:{run_id}".encode(), digest_size=8).digest()
        key = int.from_bytes(digest, "big", signed=True)
        session.execute(select(func.pg_advisory_xact_lock(key)))


def _same(old: tuple, new: tuple) -> bool:
    """Equal numbers, NaN equal to NaN (no time, no point)."""
    return all(a == b or (a != a and b != b) for a, b in zip(old, new, strict=True))


def _write_pages(session: Session, run_id: str, buckets: dict) -> None:
    """Put {(level, name, bucket): Bucket} into their pages (under lock_series): one read, and
    one write of the pages whose extremes changed (at coarse levels, a step seldom brings a new
    lowest or highest point)."""
    if not buckets:
        return
    keys = {(level, name, page_of(b)) for level, name, b in buckets}
    ranges = {}
    for level in range(1, LEVELS + 1):
        at = [page for of, _, page in keys if of == level]
        ranges |= {f"lo{level}": min(at, default=1), f"hi{level}": max(at, default=0)}  # 1..0: none
    names = sorted({name for _, name, _ in keys})
    typecodes = PAGE_COLUMNS.values()
    pages = {
        (level, name, page): [unpack(t, a) for t, a in zip(typecodes, arrays, strict=True)]
        for level, name, page, *arrays in session.connection().execute(
            _PAGES, {"run": run_id, "names": names, **ranges}
        )
    }
    changed = set()
    for (level, name, b), bucket in buckets.items():
        key = (level, name, page_of(b))
        if key not in pages:
            pages[key] = [array(e.typecode, e) for e in _EMPTY]
        steps, values, times = pages[key]
        low = (bucket.min_step, bucket.min_value, bucket.min_time)
        high = (bucket.max_step, bucket.max_value, bucket.max_time)
        first, second = (low, high) if bucket.min_step <= bucket.max_step else (high, low)
        if second[0] == first[0]:
            second = (-1, math.nan, None)
        for i, (step, value, time) in enumerate((first, second), start=2 * (b % PAGE)):
            time = math.nan if time is None else time
            if not _same((steps[i], values[i], times[i]), (step, value, time)):
                steps[i], values[i], times[i] = step, value, time
                changed.add(key)
    rows = [
        {
            "run_id": run_id,
            "level": level,
            "name": name,
            "page": page,
            **{c: _pack(a) for c, a in zip(PAGE_COLUMNS, pages[level, name, page], strict=True)},
        }
        for level, name, page in sorted(changed)
    ]
    upsert(session, MetricPage, rows, PAGE_KEYS, list(PAGE_COLUMNS))


def refresh_rollups(session: Session, run_id: str, names: list[str], steps: set[int]) -> None:
    """Recompute every level's buckets of `names` that hold `steps` (just written) from the
    level below, then their pages."""
    connection = session.connection()
    merged: dict[tuple[int, str, int], Bucket] = {}
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
        buckets = {key: Bucket.merge(parts) for key, parts in children.items()}
        _write(session, [_row(run_id, n, level, b, m) for (n, b), m in buckets.items()])
        merged.update({(level, n, b): m for (n, b), m in buckets.items()})
    _write_pages(session, run_id, merged)


def rebuild_rollups(session: Session, run_id: str) -> None:
    """Every level of a run's rollups from its metric values, a series at a time (for values
    written before rollups existed, or loaded in bulk; rebuild_pages next)."""
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


def rebuild_pages(session: Session, run_id: str) -> None:
    """Every page of a run from its rollups, a series and a level at a time (for rollups
    written before pages existed, or rebuilt)."""
    names = session.scalars(
        select(MetricRollup.name)
        .where(MetricRollup.run_id == run_id, MetricRollup.level == LEVELS)
        .distinct()
    ).all()
    for name in names:
        for level in range(1, LEVELS + 1):
            rows = session.execute(
                select(MetricRollup.bucket, *BUCKET_COLUMNS).where(
                    MetricRollup.run_id == run_id,
                    MetricRollup.level == level,
                    MetricRollup.name == name,
                )
            )
            _write_pages(session, run_id, {(level, name, b): Bucket(*f) for b, *f in rows})
