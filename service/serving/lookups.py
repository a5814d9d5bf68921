"""What an inference request's API key and `model` stand for, kept a few seconds per API process,
so that a client's next request costs no database round trip (nor a thread of the pool).

- A key's project, for KEY_TTL_S: a key revoked meanwhile is still taken by this process for up
  to KEY_TTL_S. A refused key is never kept: each try asks the database.
- A checkpoint (`ckpt_…`) of a project, for MODEL_TTL_S: a checkpoint's row does not change, and
  its folders are checked on every request, so one whose files are gone is a 410 at once. Only
  local folders are kept (checking a store's is a network call). A run (`run_…`) is read every
  time: a request sees the weights the run published just before.

Errors (401, 404, 409, 410) are the database's answers, as without these copies.
"""

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from starlette.concurrency import run_in_threadpool

from service.auth.service import authenticate
from service.config import Settings
from service.contract.storage import is_remote
from service.db import session_scope
from service.models import Project
from service.serving.models import ServedModel, resolve

KEY_TTL_S = 5.0
MODEL_TTL_S = 5.0
MAX_KEPT = 10_000  # entries of each kind; past it the expired go, or all of them

K = TypeVar("K")
V = TypeVar("V")


class Recent(Generic[K, V]):
    """Values kept for `ttl` seconds of `clock`."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl, self.clock = ttl, clock
        self.kept: dict[K, tuple[float, V]] = {}

    def get(self, key: K) -> V | None:
        entry = self.kept.get(key)
        if entry is None or entry[0] <= self.clock():
            return None
        return entry[1]

    def put(self, key: K, value: V) -> None:
        now = self.clock()
        if len(self.kept) >= MAX_KEPT:
            self.kept = {k: e for k, e in self.kept.items() if e[0] > now}
            if len(self.kept) >= MAX_KEPT:
                self.kept.clear()
        self.kept[key] = (now + self.ttl, value)

    def drop(self, key: K) -> None:
        self.kept.pop(key, None)


class Lookups:
    """One per API process (app.state.lookups)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.projects: Recent[bytes, Project] = Recent(KEY_TTL_S)
        self.models: Recent[tuple[str, str], ServedModel] = Recent(MODEL_TTL_S)

    async def project(self, authorization: str | None) -> Project:
        """The project of the request's key (401 without a valid one)."""
        # Kept by a digest of the header: no key is held in clear.
        digest = hashlib.sha256((authorization or "").encode()).digest()
        if (project := self.projects.get(digest)) is not None:
            return project
        project = await run_in_threadpool(self._authenticate, authorization)
        self.projects.put(digest, project)
        return project

    async def model(self, project: Project, name: str) -> ServedModel:
        """What `name` serves for the project (404, 409 or 410 when nothing)."""
        key = (project.id, name)
        if (model := self.models.get(key)) is not None:
            if all(Path(folder).is_dir() for folder in model.folders):
                return model
            self.models.drop(key)  # its files are gone: the database says what it is now
        model = await run_in_threadpool(self._resolve, project, name)
        if name.startswith("ckpt_") and model.folders and not any(map(is_remote, model.folders)):
            self.models.put(key, model)
        return model

    def _authenticate(self, authorization: str | None) -> Project:
        with session_scope(self.settings.resolved_database_url) as session:
            return authenticate(session, authorization, self.settings.api_key_pepper)

    def _resolve(self, project: Project, name: str) -> ServedModel:
        with session_scope(self.settings.resolved_database_url) as session:
            return resolve(session, self.settings, project, name)
