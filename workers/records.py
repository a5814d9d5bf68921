"""What the worker reads from and writes to the database for a run: lease, status, dataset
files, posted groups, per-step records, checkpoints, published weights, events.

The worker uses the same ORM models as the API, never HTTP to its own service. Per-step writes
are upserts keyed by (run, step), so a replayed step overwrites rather than duplicates. A status
changes only as the contract's table allows (service/contract/states.py).
"""

import logging
import time

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.orm import Session

from service.config import Settings
from service.contract import storage
from service.contract.events import ENDED, EventLevel, EventType
from service.contract.files import read_rows
from service.contract.metrics import REWARD_MEAN, TOKENS_TOTAL
from service.contract.spec import RetentionSpec
from service.contract.states import RunStatus, sources
from service.db import session_scope
from service.models import (
    Checkpoint,
    File,
    Metric,
    RewardRequest,
    Run,
    RunGroup,
    Sample,
)
from service.models.base import upsert, utcnow
from service.models.metric import LEVELS, MetricRollup, lock_series, refresh_rollups
from service.models.run_event import add_event
from workers.claiming import Claiming
from workers.errors import RunError
from workers.retrying import retrying
from workers.spending import Spending, Spends

log = logging.getLogger(__name__)


class RunRecorder(Claiming, Spends):
    """One run's records, for the worker that runs it (its claim: workers/claiming.py)."""

    def __init__(self, settings: Settings, run_id: str, worker_id: str) -> None:
        self.settings, self.run_id, self.worker_id = settings, run_id, worker_id
        self.url = settings.resolved_database_url
        self._private: list[tuple[str, str]] | None = None  # see _shown
        # The lead's tracking session (workers/tracking/): every metric recorded goes to it.
        self.tracking = None
        # What the attempt uses (the lead's: start_spending), written with each step, each
        # heartbeat and the attempt's end.
        self.spending: Spending | None = None

    def renew_lease(self) -> bool:
        """Heartbeat (and the attempt's usage so far); False when the lease was lost (another
        worker took the run)."""
        with session_scope(self.url) as session:
            result = session.execute(
                update(Run)
                .where(Run.id == self.run_id, Run.lease_owner == self.worker_id)
                .values(lease_expires_at=self._lease_until())
            )
            if result.rowcount == 1:
                self._write_spending(session)
            return result.rowcount == 1

    @retrying
    def status(self) -> tuple[str, str | None]:
        """The run's status and who holds its lease (None: nobody)."""
        with session_scope(self.url) as session:
            return tuple(
                session.execute(
                    select(Run.status, Run.lease_owner).where(Run.id == self.run_id)
                ).one()
            )

    @retrying
    def project_id(self) -> str:
        with session_scope(self.url) as session:
            return session.scalar(select(Run.project_id).where(Run.id == self.run_id))

    @retrying
    def webhook_secret(self) -> str:
        """The run's current secret in clear, read per request: a rotation applies at once."""
        with session_scope(self.url) as session:
            stored = session.scalar(
                select(Run.webhook_secret_encrypted).where(Run.id == self.run_id)
            )
        return self.settings.sealer.open(stored)

    @retrying
    def open_reward_request(self, request_id: str, step: int, sample_ids: list[str]) -> None:
        """Record an async request before it is sent, so an early callback finds it."""
        with session_scope(self.url) as session:
            if session.get(RewardRequest, request_id) is None:
                session.add(
                    RewardRequest(
                        id=request_id,
                        run_id=self.run_id,
                        step=step,
                        sample_ids=sample_ids,
                        rewards={},
                    )
                )

    @retrying
    def reward_results(self, request_ids: list[str]) -> dict[str, dict[str, float] | None]:
        """Each request's rewards once all of its samples have one, else None."""
        with session_scope(self.url) as session:
            rows = session.scalars(select(RewardRequest).where(RewardRequest.id.in_(request_ids)))
            return {r.id: dict(r.rewards) if r.completed_at else None for r in rows}

    @retrying
    def requested_stop(self) -> str | None:
        """ "cancel" or "pause" when the user asked for one (cancel wins), else None."""
        with session_scope(self.url) as session:
            cancel, pause = session.execute(
                select(Run.cancel_requested, Run.pause_requested).where(Run.id == self.run_id)
            ).one()
        return "cancel" if cancel else "pause" if pause else None

    @retrying
    def event(
        self,
        type_: EventType,
        message: str,
        level: EventLevel = EventLevel.INFO,
        data: dict | None = None,
    ) -> None:
        with session_scope(self.url) as session:
            add_event(session, self.run_id, type_, self._shown(session, message), level, data)

    def _shown(self, session: Session, text: str) -> str:
        """`text` (an event, an error) as the tenant may read it: the data directory, the
        checkpoint store, and the folders the run's model loads from that its spec does not
        show (a checkpoint's, a registered model's), named instead of spelt out."""
        if self._private is None:  # a run's folders do not change: read them once
            run = session.get(Run, self.run_id)
            model = run.spec.get("model", {}) if run else {}
            names = {str(self.settings.resolved_data_dir): "<data dir>"}
            if self.settings.checkpoint_url:
                names[self.settings.checkpoint_url.rstrip("/")] = "<checkpoint store>"
            for field, folder in ((run and run.model_source) or {}).items():
                if folder and folder != model.get(field):
                    names[folder] = f"<model.{field}>"
            # longest first: a checkpoint's folder before the data dir that holds it
            self._private = sorted(names.items(), key=lambda item: len(item[0]), reverse=True)
        for folder, name in self._private:
            text = text.replace(folder, name)
        return text

    def record_step(
        self,
        step: int,
        metrics: dict[str, float],
        samples: list[dict],
        tokens: int,
        retention: RetentionSpec | None = None,
    ) -> None:
        written = self._write_step(step, metrics, samples, tokens, retention)
        if self.tracking is not None:
            self.tracking.log_metrics(step, written)

    @retrying
    def _write_step(
        self,
        step: int,
        metrics: dict[str, float],
        samples: list[dict],
        tokens: int,
        retention: RetentionSpec | None,
    ) -> dict[str, float]:
        """A step's metrics (with tokens/total: returned) and samples; then, by `retention`,
        the samples of the step that has just left the kept window go."""
        sample_rows = [{"run_id": self.run_id, "step": step, **s} for s in samples]
        with session_scope(self.url) as session:
            lock_series(session, self.run_id)  # before tokens/total is read: see lock_series
            before = session.scalar(
                select(Metric.value)
                .where(Metric.run_id == self.run_id, Metric.name == TOKENS_TOTAL)
                .where(Metric.step < step)
                .order_by(Metric.step.desc())
                .limit(1)
            )
            metrics = {**metrics, TOKENS_TOTAL: (before or 0.0) + tokens}
            self._upsert_metrics(session, step, metrics)
            upsert(
                session,
                Sample,
                sample_rows,
                ["run_id", "step", "group_index", "sample_index"],
                [
                    "prompt",
                    "completion",
                    "answer",
                    "reward",
                    "source",
                    "episode",
                    "row",
                    "weight",
                    "logratio",
                ],
            )
            if retention is not None and (gone := retention.drops(step)) is not None:
                session.execute(
                    delete(Sample).where(Sample.run_id == self.run_id, Sample.step == gone)
                )
            run = session.get(Run, self.run_id)
            if run.step < step:  # a replayed step does not count its tokens twice
                run.tokens_generated += tokens
                run.samples_generated += len(samples)
            if run.step <= step:
                run.reward = metrics.get(REWARD_MEAN)
            run.step = max(run.step, step)
            self._write_spending(session)
        return metrics

    @retrying
    def take_groups(self, step: int, most: int, multiple: int, whole: bool = False) -> list[dict]:
        """Groups posted to the run for `step`'s off-policy slots, oldest first: at most `most`,
        a multiple of `multiple` (the rollout engines), marked as taken at `step`; `whole`: all
        `most` or none (none taken). A step replayed after a resume takes again the groups it
        took before."""
        with session_scope(self.url) as session:
            rows = list(
                session.scalars(
                    select(RunGroup)
                    .where(RunGroup.run_id == self.run_id, self._available(step))
                    .order_by(RunGroup.id)
                    .limit(most)
                )
            )
            rows = rows[: len(rows) - len(rows) % multiple]
            if whole and len(rows) < most:
                return []
            for row in rows:
                row.taken_step = step
            return [row.body for row in rows]

    @retrying
    def pending_groups(self, step: int) -> int:
        """How many posted groups `step` could take now."""
        with session_scope(self.url) as session:
            return session.scalar(
                select(func.count())
                .select_from(RunGroup)
                .where(RunGroup.run_id == self.run_id, self._available(step))
            )

    @staticmethod
    def _available(step: int):
        """A group `step` may take: not taken, or taken by it or a later step (a replay)."""
        return or_(RunGroup.taken_step.is_(None), RunGroup.taken_step >= step)

    def record_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Metrics of a finished step that come after it (an evaluation): upserted beside it."""
        self._write_metrics(step, metrics)
        if self.tracking is not None:
            self.tracking.log_metrics(step, metrics)

    @retrying
    def _write_metrics(self, step: int, metrics: dict[str, float]) -> None:
        with session_scope(self.url) as session:
            lock_series(session, self.run_id)
            self._upsert_metrics(session, step, metrics)

    @retrying
    def tracking_state(self) -> tuple[dict, dict[str, int]]:
        """For a tracking session: the run's stored spec, and the last step recorded of each
        metric so far (an earlier attempt's, which a resumed attempt replays)."""
        with session_scope(self.url) as session:
            spec = session.scalar(select(Run.spec).where(Run.id == self.run_id))
            last = session.execute(  # from the coarsest rollups: a few rows a series
                select(MetricRollup.name, func.max(MetricRollup.last_step))
                .where(MetricRollup.run_id == self.run_id, MetricRollup.level == LEVELS)
                .group_by(MetricRollup.name)
            ).all()
        return dict(spec), dict(last)

    def _upsert_metrics(self, session: Session, step: int, metrics: dict[str, float]) -> None:
        """Under lock_series, which the caller took first."""
        now = time.time()
        rows = [
            {"run_id": self.run_id, "name": name, "step": step, "value": float(value), "time": now}
            for name, value in sorted(metrics.items())  # in key order: see _write in metric.py
        ]
        upsert(session, Metric, rows, ["run_id", "name", "step"], ["value", "time"])
        refresh_rollups(session, self.run_id, sorted(metrics), {step})

    @retrying
    def record_checkpoint(
        self, step: int, path: str, size: int, kind: str, keep_last: int | None
    ) -> None:
        ckpt_id = f"ckpt_{self.run_id[4:]}_{step}"
        with session_scope(self.url) as session:
            upsert(
                session,
                Checkpoint,
                [
                    {
                        "id": ckpt_id,
                        "run_id": self.run_id,
                        "step": step,
                        "path": str(path),
                        "bytes": size,
                        "kind": kind,
                        "created_at": utcnow(),
                    }
                ],
                ["run_id", "step"],
                ["path", "bytes", "kind", "created_at"],
            )
            add_event(
                session,
                self.run_id,
                EventType.CHECKPOINT_SAVED,
                f"checkpoint at step {step}",
                data={"step": step, "checkpoint_id": ckpt_id, "bytes": size},
            )
            if keep_last:
                self._prune(session, keep_last)

    @retrying
    def record_weights(self, step: int, path: str) -> None:
        """The run's newest weights for serving (workers/publish.py): inference workers serving
        the run's model reload when they change."""
        with session_scope(self.url) as session:
            session.execute(
                update(Run)
                .where(Run.id == self.run_id)
                .values(weights_step=step, weights_path=path)
                .execution_options(synchronize_session=False)
            )

    @retrying
    def serving_asked(self) -> bool:
        """Whether a request has named the run as its model (service/serving/models.py): only
        then does it publish weights."""
        with session_scope(self.url) as session:
            asked = session.scalar(select(Run.serving_asked_at).where(Run.id == self.run_id))
            return asked is not None

    @retrying
    def latest_checkpoint(self) -> tuple[int, str] | None:
        """The newest checkpoint whose files are still there (a folder, or a complete upload in
        the object store): where a resumed run continues."""
        with session_scope(self.url) as session:
            rows = session.execute(
                select(Checkpoint.step, Checkpoint.path)
                .where(Checkpoint.run_id == self.run_id)
                .order_by(Checkpoint.step.desc())
            ).all()
        return next(((step, path) for step, path in rows if storage.exists(path)), None)

    def _prune(self, session: Session, keep_last: int) -> None:
        rows = list(
            session.scalars(
                select(Checkpoint)
                .where(Checkpoint.run_id == self.run_id)
                .order_by(Checkpoint.step.desc())
                .offset(keep_last)
            )
        )
        for old in rows:
            try:
                storage.discard(old.path)
            except Exception:  # a store outage must not fail the run over an old checkpoint
                log.warning(
                    "run %s: could not remove old checkpoint %s",
                    self.run_id,
                    old.path,
                    exc_info=True,
                )
        if rows:
            session.execute(delete(Checkpoint).where(Checkpoint.id.in_([r.id for r in rows])))

    def _move(self, session: Session, status: RunStatus) -> Run | None:
        """The run, moved to `status` and its lease given up; None (nothing written) when the
        contract does not allow it: another actor ended or requeued the run meanwhile."""
        moved = session.execute(
            update(Run)
            .where(Run.id == self.run_id, Run.status.in_(sources(status)))
            .values(status=status, lease_owner=None, lease_expires_at=None)
            .execution_options(synchronize_session=False)
        ).rowcount
        run = session.get(Run, self.run_id)
        session.refresh(run)
        if not moved:
            log.warning("run %s is %s; not marking it %s", self.run_id, run.status, status)
            return None
        return run

    @retrying
    def pause(self, step: int) -> None:
        """Give the run up until /resume: no lease, no worker, its last checkpoint kept."""
        with session_scope(self.url) as session:
            if (run := self._move(session, RunStatus.PAUSED)) is None:
                return
            self._write_spending(session)
            run.pause_requested = False
            add_event(
                session,
                self.run_id,
                EventType.RUN_PAUSED,
                f"run paused after step {step}; resume continues from there",
                data={"step": step},
            )

    @retrying
    def finish(
        self,
        status: RunStatus,
        message: str,
        level: EventLevel = EventLevel.INFO,
        data: dict | None = None,
        error: str | None = None,
    ) -> None:
        with session_scope(self.url) as session:
            if (run := self._move(session, status)) is None:
                return
            self._write_spending(session)
            run.finished_at = utcnow()
            run.error = error and self._shown(session, error)
            message = self._shown(session, message)
            add_event(session, self.run_id, ENDED[status], message, level, data)

    def fail(self, message: str, data: dict | None = None) -> None:
        """End the run as failed: "run failed: <message>" in its event, `message` its error."""
        self.finish(
            RunStatus.FAILED, f"run failed: {message}", EventLevel.ERROR, data, error=message
        )

    @retrying
    def dataset_rows(self, field: str, file_id: str) -> list[dict]:
        """The rows of the run's dataset file `file_id` (the spec's dataset.<field>)."""
        with session_scope(self.url) as session:
            file = session.get(File, file_id)
            if file is None:
                raise RunError(f"dataset.{field} {file_id!r} no longer exists")
            path = file.path
        return read_rows(path)
