"""Engine and session factories.

One session per request or task; the boundary (``session_scope``) commits or rolls back in one
place. Work that must only happen once the data is durable (enqueueing a run) is registered with
``after_commit`` and dropped on rollback.
"""

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
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


def create_event_loop_engine(url: str) -> AsyncEngine | None:
    """An engine whose connections wait on the event loop (psycopg's async connections), for
    the API's routes under the heaviest load; None on SQLite, whose driver only blocks. Its
    connections belong to the loop that opened them: the API makes one per lifespan and
    disposes of it when the lifespan ends. A pool of its own, as large as POOL: past it, each
    request in flight opened and closed a connection of its own. Its connections autocommit:
    what uses it writes at most one statement (deps.answer_in_session)."""
    if url.startswith("sqlite"):
        return None
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT", **POOL)
    _ping_when_idle(engine.sync_engine)
    return engine


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
