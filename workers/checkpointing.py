"""A run's checkpoint I/O: where its checkpoints are, getting them (and models it starts from)
onto this machine, and writing new ones to the store with the run's record of them.

Checkpoints are folders (learner/checkpoint.py writes and reads their contents), kept in the
data dir or, with settings.checkpoint_url, in an object store (service/contract/storage.py).
The lead process does all the I/O; under data parallelism the other ranks read the lead's
local copy and learn of failures through `ranks.share`.
"""

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from service.config import Settings
from service.contract import storage
from service.contract.events import EventLevel, EventType
from service.contract.spec import RunSpec
from service.contract.storage import CheckpointKind
from workers.errors import RunError
from workers.learner.checkpoint import save_checkpoint
from workers.ranks import Ranks
from workers.records import RunRecorder

log = logging.getLogger(__name__)

UPLOAD_ATTEMPTS = 3
UPLOAD_BACKOFF_S = 1.0  # doubled per try


class RunCheckpoints:
    def __init__(self, settings: Settings, recorder: RunRecorder, ranks: Ranks) -> None:
        self.settings, self.recorder, self.ranks = settings, recorder, ranks
        self.run_dir = settings.runs_dir / recorder.run_id

    def latest(self) -> tuple[int, str] | None:
        """(step, path) of the newest checkpoint whose files are there, on every rank; None for
        a run that has none (it starts from the beginning)."""
        return self.ranks.share(self.recorder.latest_checkpoint() if self.ranks.lead else None)

    def local_copy(self, path: str, cache: Path, what: str) -> Path:
        """`path` as a local folder: one in the object store is downloaded into `cache` under
        the run's folder first (this worker may not be the one that wrote it)."""
        if not storage.is_remote(path):
            return Path(path)
        failure = None  # the lead downloads; every rank reads its copy
        if self.ranks.lead:
            try:
                storage.download(path, cache)
            except Exception as exc:
                failure = f"{type(exc).__name__}: {exc}"
        if failure := self.ranks.share(failure):
            raise RunError(f"could not download {what} from {path}: {failure}")
        return cache

    def resume_copy(self, step: int, path: str) -> Path:
        """The local folder of the checkpoint to resume from."""
        return self.local_copy(
            path,
            self.run_dir / "checkpoint-cache" / f"step_{step:06d}",
            f"the checkpoint of step {step}",
        )

    def done_with(self, path: str, local: Path) -> None:
        """Every rank has read the checkpoint at `path` from `local`: a downloaded copy goes."""
        self.ranks.share(None)
        if storage.is_remote(path) and self.ranks.lead:
            shutil.rmtree(local, ignore_errors=True)

    def local_model(self, spec: RunSpec) -> RunSpec:
        """The spec with its model on this machine: a model.path or model.adapter in the object
        store (a checkpoint the run starts from) is downloaded into the run's folder first."""
        local = {
            name: str(
                self.local_copy(path, self.run_dir / "start-cache" / name, f"model.{name} {path}")
            )
            for name in ("path", "adapter")
            if (path := getattr(spec.model, name)) and storage.is_remote(path)
        }
        if not local:
            return spec
        return spec.model_copy(update={"model": spec.model.model_copy(update=local)})

    def save(
        self,
        step: int,
        spec: RunSpec,
        model,
        tokenizer,
        extra: dict[str, Any],
        optimizer_state: dict,
        model_state: dict | None,
    ) -> None:
        """Write the lead's checkpoint of `step`, put it in the store when there is one, and
        record it (pruning to checkpoint.keep_last)."""
        path = self.run_dir / "checkpoints" / f"step_{step:06d}"
        size = save_checkpoint(path, model, tokenizer, step, extra, optimizer_state, model_state)
        if self.recorder.tracking is not None:  # before the folder may go to the store
            self.recorder.tracking.log_checkpoint(step, path)
        kind = CheckpointKind.FULL if spec.model.lora is None else CheckpointKind.LORA_ADAPTER
        where, store_url = str(path), self.settings.checkpoint_url
        if store_url:
            where = f"{store_url.rstrip('/')}/{self.recorder.run_id}/{path.name}"
            self._upload(step, path, where)
            # Workers' local disks are not shared: the API and the worker that resumes this run
            # read the store, so a local copy would only fill this machine's disk.
            shutil.rmtree(path, ignore_errors=True)
        storage.remove(storage.merged_path(where))  # made from a replayed step's older weights
        self.recorder.record_checkpoint(step, where, size, kind, spec.checkpoint.keep_last)

    def _upload(self, step: int, local: Path, url: str) -> None:
        """Copy the checkpoint to the store, trying UPLOAD_ATTEMPTS times with backoff (an
        object store's brief outage or throttling); then the run fails naming the URL, its
        earlier checkpoints kept."""
        for attempt in range(1, UPLOAD_ATTEMPTS + 1):
            try:
                storage.upload(local, url)
                return
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                if attempt == UPLOAD_ATTEMPTS:
                    raise RunError(
                        f"could not upload the checkpoint of step {step} to {url} "
                        f"after {attempt} tries: {error}"
                    ) from exc
                log.warning(
                    "run %s: checkpoint upload to %s failed (%s); retrying",
                    self.recorder.run_id,
                    url,
                    error,
                )
                self.recorder.event(
                    EventType.CHECKPOINT_UPLOAD_RETRY,
                    f"upload of the step {step} checkpoint to {url} failed "
                    f"(try {attempt} of {UPLOAD_ATTEMPTS}): {error}",
                    EventLevel.WARNING,
                    {"step": step, "url": url, "attempt": attempt},
                )
                time.sleep(UPLOAD_BACKOFF_S * 2 ** (attempt - 1))
