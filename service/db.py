"""Engine and session factories.

One session per request or task; the boundary (``session_scope``) commits or rolls back in one
place. Work that must only happen once the data is durable (enqueueing a run) is registered with
``after_commit`` and dropped on rollback.
"""

import time
from collections import namedtuple
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from functools import lru_cache
from types import SimpleNamespace
from typing import Any, TypeVar

import asyncpg
from sqlalchemy import Dialect, Engine, Executable, create_engine, event, make_url
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.exc import DataError, DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

_AFTER_COMMIT = "gvpo_after_commit"


# Connections kept open per process, and opened past them while busy. The API's threadpool
# runs up to 40 requests at once: with SQLAlchemy's default (5 kept, 10 more) a loaded API
# opened and closed a connection per request past the fifth (on PostgreSQL a new server
# process each time), and made the sixteenth wait for one. Unused, they are never opened.
POOL = {"pool_size": 20, "max_overflow": 20}
IDLE_BEFORE_PING_S = 5.0
_IDLE_SINCE = "gvpo_idle_since"


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # The API and the worker write concurrently: WAL lets readers proceed, and the busy
        # timeout makes a second writer wait rather than fail.
        memory = url in ("sqlite://", "sqlite:///:memory:")  # one connection per thread
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            **({} if memory else POOL),
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    engine = create_engine(url, **POOL)
    _ping_when_idle(engine)
    return engine


class LoopPool:
    """Connections that wait on the event loop, for the API's routes under the heaviest load
    (run_steps_on_loop): asyncpg's own pool, given the database URL as a libpq connection
    string (asyncpg reads libpq's options in it, sslmode, sslrootcert, ..., as psycopg does, and
    takes any other as a server setting), whatever driver the URL names. asyncpg costs a third
    less CPU per statement than psycopg's async connections; and taking a connection, running
    `SELECT 1` and giving it back cost 0.19 ms of CPU through SQLAlchemy's async pool (whose
    checkout and return switch greenlets) against 0.07 ms through this one. Its connections
    belong to the loop that opened them: the API opens one per lifespan and closes it when the
    lifespan ends. As large as POOL's two together, opened as needed (none when unused) and
    closed after 5 minutes unused.

    Its connections autocommit: what uses it writes at most one statement. So nothing is left
    to reset when one goes back to the pool but a transaction, which asyncpg rolls back anyway:
    its default reset (a statement clearing locks, cursors, listeners and settings it never
    makes) would cost each request a round trip. A connection the server closed (a restart, an
    idle timeout) is seen closed by the loop watching its socket and replaced when next taken,
    which is what get_engine's ping of idle connections does for blocking ones. JSON columns are
    decoded as SQLAlchemy's asyncpg dialect decodes them, whose statements' type conversions
    run_steps_on_loop applies."""

    def __init__(self, url: str) -> None:
        self.dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        self.dialect = PGDialect_asyncpg(dbapi=PGDialect_asyncpg.import_dbapi())
        self.pool: asyncpg.Pool | None = None

    async def open(self) -> "LoopPool":
        self.pool = await asyncpg.create_pool(
            self.dsn,
            min_size=0,
            max_size=POOL["pool_size"] + POOL["max_overflow"],
            max_inactive_connection_lifetime=300.0,
            init=self._decode_json,
            reset=_nothing_to_reset,
        )
        return self

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()

    async def _decode_json(self, conn: asyncpg.Connection) -> None:
        adapted = SimpleNamespace(_connection=conn)  # what the dialect's hooks are given
        await self.dialect.setup_asyncpg_json_codec(adapted)
        await self.dialect.setup_asyncpg_jsonb_codec(adapted)


async def _nothing_to_reset(_conn: asyncpg.Connection) -> None:
    """See LoopPool: an open transaction was already rolled back by the pool."""


async def open_loop_pool(url: str) -> LoopPool | None:
    """The API's LoopPool for `url`; None on SQLite, whose driver only blocks."""
    if url.startswith("sqlite"):
        return None
    return await LoopPool(url).open()


T = TypeVar("T")
# Work written as the statements it runs, so that it runs the same in a session and on the
# event loop's driver (run_steps, run_steps_on_loop): it yields (statement, parameters) and is
# sent back a SELECT's rows (a list of named tuples) or any other statement's row count; it
# yields AFRESH to see the database anew (after a write that lost a race), and returns its
# answer.
Step = tuple[Executable, dict[str, Any]]
Steps = Generator[Step | None, Any, T]
AFRESH = None


def run_steps(session: Session, steps: Steps[T]) -> T:
    """`steps` run in `session` (AFRESH: rolled back, for a snapshot that sees the others'
    commits)."""
    answer = None
    while True:
        try:
            step = steps.send(answer)
        except StopIteration as done:
            return done.value
        if step is AFRESH:
            session.rollback()
            answer = None
            continue
        statement, params = step
        result = session.execute(statement, params)
        answer = result.all() if statement.is_select else result.rowcount


async def run_steps_on_loop(loop_pool: LoopPool, steps: Steps[T]) -> T:
    """`steps` run on one of the loop pool's asyncpg connections, each statement committing as
    it runs (autocommit, so AFRESH needs nothing). No session, ORM or greenlet: for the API's
    busiest routes (deps.answer_steps), whose statements cost more CPU in SQLAlchemy's
    execution than in asyncpg. (Its loop mirrors run_steps': one is synchronous, the other
    awaits.) Each statement is compiled once by SQLAlchemy, and its
    parameters and columns are converted by their types as SQLAlchemy's execution converts
    them; a value the database refuses raises SQLAlchemy's DataError, as it would there."""
    async with loop_pool.pool.acquire() as driver:
        answer = None
        while True:
            try:
                step = steps.send(answer)
            except StopIteration as done:
                return done.value
            if step is AFRESH:
                answer = None
                continue
            statement, params = step
            answer = await _on_driver(statement, loop_pool.dialect).run(driver, params)


class _OnDriver:
    """A Core statement compiled for asyncpg (positional $n parameters), with its parameters'
    and columns' type conversions (SQLAlchemy's bind and result processors for the dialect)."""

    def __init__(self, statement: Executable, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        self.sql, self.compiled, self.dialect = str(compiled), compiled, dialect
        self.names = compiled.positiontup
        self.to_db = [
            compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect)
            for name in self.names
        ]
        self.columns = statement.selected_columns if statement.is_select else None
        if self.columns is not None:
            self.row = namedtuple("Row", [column.key for column in self.columns], rename=True)
        self.from_db: list[tuple[int, Callable]] | None = None  # known at the first SELECT

    async def _result_processors(self, driver) -> list[tuple[int, Callable]]:
        # Some processors depend on the column's type as the database sends it (a float or a
        # numeric): learnt once, from the statement's description.
        described = (await driver.prepare(self.sql)).get_attributes()
        processors = [
            column.type.dialect_impl(self.dialect).result_processor(self.dialect, attr.type.oid)
            for column, attr in zip(self.columns, described, strict=True)
        ]
        return [(n, process) for n, process in enumerate(processors) if process is not None]

    async def run(self, driver, params: dict[str, Any]) -> list | int:
        values = self.compiled.construct_params(params)
        args = [
            values[name] if convert is None else convert(values[name])
            for name, convert in zip(self.names, self.to_db, strict=True)
        ]
        try:
            if self.columns is None:
                status = await driver.execute(self.sql, *args)  # e.g. "UPDATE 1"
                return int(status.rsplit(" ", 1)[-1])
            if self.from_db is None:
                self.from_db = await self._result_processors(driver)
            records = await driver.fetch(self.sql, *args)
        except asyncpg.DataError as exc:  # SQLSTATE class 22, or a value it cannot send
            raise DataError(self.sql, args, exc) from exc
        if not self.from_db:
            return [self.row(*record) for record in records]
        rows = []
        for record in records:
            row = list(record)
            for n, process in self.from_db:
                row[n] = process(row[n])
            rows.append(self.row(*row))
        return rows


@lru_cache(maxsize=64)
def _on_driver(statement: Executable, dialect: Dialect) -> _OnDriver:
    return _OnDriver(statement, dialect)


def _ping_when_idle(engine: Engine) -> None:
    """SQLAlchemy's pool_pre_ping, for connections idle IDLE_BEFORE_PING_S or more: one that the
    server closed meanwhile (a restart, an idle timeout) is replaced before it is used. Every
    checkout would otherwise cost a round trip, for connections a busy API uses constantly."""
    dialect = engine.dialect

    def checkin(_dbapi_conn, record) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()

    def checkout(dbapi_conn, record, _proxy) -> None:
        idle_since = record.info.get(_IDLE_SINCE)
        if idle_since is None or time.monotonic() - idle_since < IDLE_BEFORE_PING_S:
            return  # just opened, or in use moments ago
        try:
            dialect.do_ping(dbapi_conn)
        except dialect.loaded_dbapi.Error as exc:  # the pool drops it and takes another
            raise DisconnectionError(f"a pooled connection was closed: {exc}") from exc

    event.listen(engine, "checkin", checkin)
    event.listen(engine, "checkout", checkout)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


@lru_cache(maxsize=8)
def get_sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


def after_commit(session: Session, fn: Callable[[], None]) -> None:
    """Run ``fn`` after the session's transaction commits; forget it on rollback."""
    session.info.setdefault(_AFTER_COMMIT, []).append(fn)


def commit(session: Session) -> list[Callable[[], None]]:
    """Commit; the after-commit work registered meanwhile, for the caller to run."""
    session.commit()
    return session.info.pop(_AFTER_COMMIT, [])


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    session = get_sessionmaker(url)()
    try:
        yield session
        callbacks = commit(session)
    except BaseException:
        session.rollback()
        session.info.pop(_AFTER_COMMIT, None)
        raise
    finally:
        session.close()
    for fn in callbacks:
        fn()
