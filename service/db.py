"""Engine and session factories.

One session per request or task; the boundary (``session_scope``) commits or rolls back in one
place. Work that must only happen once the data is durable (enqueueing a run) is registered with
``after_commit`` and dropped on rollback.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

_AFTER_COMMIT = "gvpo_after_commit"


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # The API and the worker write concurrently: WAL lets readers proceed, and the busy
        # timeout makes a second writer wait rather than fail.
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


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


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    session = get_sessionmaker(url)()
    try:
        yield session
        session.commit()
        callbacks = session.info.pop(_AFTER_COMMIT, [])
    except BaseException:
        session.rollback()
        session.info.pop(_AFTER_COMMIT, None)
        raise
    finally:
        session.close()
    for fn in callbacks:
        fn()
