"""Re-scoring a run's stored samples with a new reward (service/rescores/service.py says why).

The task claims the rescore with a lease (renewed by a heartbeat; the reaper re-queues it when
the lease expires), then goes through the run's steps in order. Each step's groups are scored
as one batch by the new reward, exactly as the run's own scorer would score a step, and applied
in one transaction: every sample's reward replaced, the value it replaces kept in
reward_history, the rescore's progress moved on. A task that dies part-way is followed by one
that continues after the last step applied, and a worker that lost the lease writes nothing.
At the end the run's groups, with their new rewards, become a file of purpose offpolicy.
"""

import logging
from collections import defaultdict
from datetime import timedelta

from pydantic import TypeAdapter
from sqlalchemy import func, or_, select, update

from service.config import Settings
from service.contract.chat import is_chat, row_item
from service.contract.events import EventLevel, EventType
from service.contract.files import FilePurpose, common_fields, write_rows
from service.contract.groups import POLICY, group_problem
from service.contract.rewards import RewardSpec
from service.contract.states import RescoreStatus
from service.db import session_scope
from service.models import File, Rescore, RewardHistory, Run, Sample, Usage
from service.models.base import new_id, upsert, utcnow
from service.models.run_event import add_event
from workers.data import Example
from workers.errors import RunError
from workers.heartbeat import Heartbeat
from workers.records import RunRecorder
from workers.rewards.graders import grading_context, record_errors
from workers.rewards.scoring import build_scorer
from workers.rewards.webhook import WebhookContext
from workers.rollout.base import Completion, Rollout, Turn
from workers.spending import COUNTED, RESCORE_ATTEMPT, USAGE_KEYS, Spending
from workers.step_metrics import recorded_message
from workers.watchdog import Watchdog

log = logging.getLogger(__name__)

REWARD = TypeAdapter(RewardSpec)


class LeaseLost(Exception):
    pass


class RescoreRecorder:
    """The rescore's rows: claim, lease, progress, outcome."""

    def __init__(self, settings: Settings, rescore_id: str, worker_id: str) -> None:
        self.settings, self.rescore_id, self.worker_id = settings, rescore_id, worker_id
        self.url = settings.resolved_database_url

    def _lease_until(self):
        return utcnow() + timedelta(seconds=self.settings.lease_seconds)

    def claim(self) -> Rescore | None:
        """Take the rescore (queued, or running under an expired lease); None if another
        worker has it or it has ended. The row comes back detached, as it was claimed."""
        now = utcnow()
        with session_scope(self.url) as session:
            taken = (
                session.execute(
                    update(Rescore)
                    .where(
                        Rescore.id == self.rescore_id,
                        or_(
                            Rescore.status == RescoreStatus.QUEUED,
                            (Rescore.status == RescoreStatus.RUNNING)
                            & (Rescore.lease_expires_at < now),
                        ),
                    )
                    .values(
                        status=RescoreStatus.RUNNING,
                        lease_owner=self.worker_id,
                        lease_expires_at=self._lease_until(),
                        started_at=func.coalesce(Rescore.started_at, now),
                    )
                ).rowcount
                == 1
            )
            rescore = session.get(Rescore, self.rescore_id)
            if taken:
                session.expunge(rescore)
            return rescore if taken else None

    def renew_lease(self) -> bool:
        with session_scope(self.url) as session:
            return (
                session.execute(
                    update(Rescore)
                    .where(Rescore.id == self.rescore_id, Rescore.lease_owner == self.worker_id)
                    .values(lease_expires_at=self._lease_until())
                ).rowcount
                == 1
            )

    def apply(
        self,
        step: int,
        samples: list[int],
        old: list[float],
        new: list[float],
        spent: list[dict],
    ) -> None:
        """One step's new rewards, its old ones kept, and the calls it took added to the run's
        usage (`spent`: Usage rows of RESCORE_ATTEMPT), in one transaction that first checks
        that this worker still holds the lease."""
        with session_scope(self.url) as session:
            if (
                session.execute(
                    update(Rescore)
                    .where(Rescore.id == self.rescore_id, Rescore.lease_owner == self.worker_id)
                    .values(last_step=step, samples_scored=Rescore.samples_scored + len(samples))
                ).rowcount
                != 1
            ):
                raise LeaseLost()
            session.add_all(
                RewardHistory(sample_id=s, rescore_id=self.rescore_id, reward=r)
                for s, r in zip(samples, old, strict=True)
            )
            session.execute(
                update(Sample),
                [
                    {"id": s, "reward": r}  # by primary key
                    for s, r in zip(samples, new, strict=True)
                ],
            )
            upsert(session, Usage, spent, USAGE_KEYS, list(COUNTED), add=True)

    def finish(
        self,
        status: RescoreStatus,
        message: str,
        error: str | None = None,
        file_id: str | None = None,
    ) -> None:
        with session_scope(self.url) as session:
            rescore = session.get(Rescore, self.rescore_id)
            if rescore.lease_owner != self.worker_id:
                return  # another worker took it over
            rescore.status, rescore.error, rescore.file_id = status, error, file_id
            rescore.finished_at, rescore.lease_owner = utcnow(), None
            rescore.lease_expires_at = None
            succeeded = status == RescoreStatus.SUCCEEDED
            if succeeded:
                rescore.reward_mean_after = session.scalar(
                    select(func.avg(Sample.reward)).where(Sample.run_id == rescore.run_id)
                )
            add_event(
                session,
                rescore.run_id,
                EventType.RESCORE_SUCCEEDED if succeeded else EventType.RESCORE_FAILED,
                message,
                EventLevel.INFO if succeeded else EventLevel.ERROR,
                {
                    "rescore_id": rescore.id,
                    "file_id": file_id,
                    "reward_mean_before": rescore.reward_mean_before,
                    "reward_mean_after": rescore.reward_mean_after,
                },
            )


def execute_rescore(settings: Settings, rescore_id: str, worker_id: str) -> str:
    """Re-score if this worker can claim the rescore; returns how it ended or why it skipped."""
    recorder = RescoreRecorder(settings, rescore_id, worker_id)
    rescore = recorder.claim()
    if rescore is None:
        return "skipped: ended, or another worker holds it"
    heartbeat = Heartbeat(recorder, settings.heartbeat_seconds, Watchdog(None))
    heartbeat.start()
    try:
        file_id = _rescore(settings, recorder, rescore)
    except LeaseLost:
        log.warning("rescore %s: lease lost to another worker; stopping", rescore_id)
        return "lease lost"
    except Exception as exc:
        log.exception("rescore %s failed", rescore_id)
        error = str(exc) if isinstance(exc, RunError) else f"{type(exc).__name__}: {exc}"
        recorder.finish(RescoreStatus.FAILED, f"rescore {rescore_id} failed: {error}", error=error)
        return RescoreStatus.FAILED
    finally:
        heartbeat.stopped.set()
    recorder.finish(
        RescoreStatus.SUCCEEDED,
        f"rescore {rescore_id} re-scored "
        f"{rescore.samples_total} samples; their groups are file {file_id}",
        file_id=file_id,
    )
    return RescoreStatus.SUCCEEDED


def _rescore(settings: Settings, recorder: RescoreRecorder, rescore: Rescore) -> str:
    """Score every step after the last one applied; returns the file of re-scored groups."""
    run_recorder = RunRecorder(settings, rescore.run_id, recorder.worker_id)
    with session_scope(settings.resolved_database_url) as session:
        project_id = session.get(Run, rescore.run_id).project_id
    # the reward calls it sends, counted by the webhook context as a run's attempt counts them
    run_recorder.spending = spending = Spending(
        rescore.run_id, project_id, RESCORE_ATTEMPT, "cpu", 0, utcnow()
    )
    context = WebhookContext.of_run(settings, run_recorder, batch_tag=f"rescore{rescore.number}s")
    grading = grading_context(settings, run_recorder)
    scorer = build_scorer(REWARD.validate_python(rescore.reward), context, grading)
    stored = StoredRows(settings, run_recorder)
    with session_scope(settings.resolved_database_url) as session:
        steps = session.scalars(
            select(Sample.step)
            .distinct()
            .where(Sample.run_id == rescore.run_id, Sample.step > rescore.last_step)
            .order_by(Sample.step)
        ).all()
    try:
        for step in steps:
            ids, old, examples, rollouts = _step_groups(settings, rescore.run_id, step, stored)
            scores = scorer.score(step, examples, rollouts, purpose="rescore")
            record_errors(run_recorder, step, scores.errors, len(ids), "rescore")
            new = scores.rewards.flatten().tolist()  # (G, k) flattened
            recorder.apply(step, ids, old, new, _usage_rows(spending))
    finally:  # the calls of a step that failed, or was not applied, were sent all the same
        if leftover := _usage_rows(spending):
            try:
                with session_scope(settings.resolved_database_url) as session:
                    upsert(session, Usage, leftover, USAGE_KEYS, list(COUNTED), add=True)
            except Exception:  # the database is down: what failed the rescore is what to say
                log.warning("rescore %s: its last calls are not in the usage", rescore.id)
    return _export(settings, rescore)


def _usage_rows(spending: Spending) -> list[dict]:
    """The calls counted since the last step applied, as Usage rows to add (one per day)."""
    return [
        {
            "run_id": spending.run_id,
            "attempt": spending.attempt,
            "day": day,
            "project_id": spending.project_id,
            "device": spending.device,
            "device_seconds": 0.0,
            **{name: counts.get(name, 0) for name in COUNTED},
        }
        for day, counts in spending.take().items()
    ]


class StoredRows:
    """The examples of stored samples, as the run's scorer had them: a sample keeps the index
    of its prompt's row in the run's training file (read once, when first needed), so it gets
    the row's fields as its `item` and a chat row's messages and tools again. A sample with no
    row (an off-policy group's), or of a run whose file is gone, has its prompt, and its answer
    as its item's only field (the run's answer field)."""

    def __init__(self, settings: Settings, recorder: RunRecorder) -> None:
        with session_scope(settings.resolved_database_url) as session:
            self.dataset = session.get(Run, recorder.run_id).spec["dataset"]
        self.recorder, self._rows = recorder, None

    def rows(self) -> list[dict]:
        if self._rows is None:
            try:
                self._rows = self.recorder.dataset_rows("train_file", self.dataset["train_file"])
            except RunError:
                self._rows = []
        return self._rows

    def example(self, sample) -> Example:
        """`sample`: a row of samples' prompt, answer, episode and row columns."""
        played = sample.episode and sample.episode["prompt_messages"]  # an episode's prompt
        if sample.row is not None and sample.row < len(rows := self.rows()):
            row = rows[sample.row]
            messages = played or (row["messages"] if is_chat(row) else None)
            tools = row.get("tools") if is_chat(row) else None
            return Example(sample.prompt, sample.answer, messages, tools, row_item(row), sample.row)
        item = {} if sample.answer is None else {self.dataset["answer_field"]: sample.answer}
        return Example(sample.prompt, sample.answer, played, item=item)


def _step_groups(settings: Settings, run_id: str, step: int, stored: StoredRows):
    """A step's samples as the scorer takes them: sample ids and rewards in group order, and
    each group's example (`stored` says how) and completions."""
    with session_scope(settings.resolved_database_url) as session:
        rows = session.execute(
            select(
                Sample.id,
                Sample.group_index,
                Sample.prompt,
                Sample.answer,
                Sample.completion,
                Sample.reward,
                Sample.episode,
                Sample.row,
            )
            .where(Sample.run_id == run_id, Sample.step == step)
            .order_by(Sample.group_index, Sample.sample_index)
        ).all()
    groups: dict[int, list] = defaultdict(list)
    for row in rows:
        groups[row.group_index].append(row)
    ordered = [row for group in groups.values() for row in group]
    # An episode is re-scored on its final conversation: the prompt's messages and every turn.
    examples = [stored.example(g[0]) for g in groups.values()]
    rollouts = [
        Rollout(prompt_ids=[], completions=[_recorded(r) for r in g]) for g in groups.values()
    ]
    return [r.id for r in ordered], [r.reward for r in ordered], examples, rollouts


def _recorded(row) -> Completion:
    """A recorded sample as the scorer takes it (an episode with its turns and end)."""
    if row.episode is None:
        return Completion(row.completion, [], "stop")
    turns = [Turn(recorded_message(t), t["tokens"], t["trained"]) for t in row.episode["turns"]]
    return Completion(row.completion, [], row.episode["end"], turns=turns)


def _export(settings: Settings, rescore: Rescore) -> str:
    """The run's groups with their new rewards, as an offpolicy file of the run's project;
    what the run sampled itself is labelled with the run's id."""
    with session_scope(settings.resolved_database_url) as session:
        run = session.get(Run, rescore.run_id)
        rows = session.execute(
            select(
                Sample.step,
                Sample.group_index,
                Sample.prompt,
                Sample.answer,
                Sample.completion,
                Sample.reward,
                Sample.source,
                Sample.episode,
            )
            .where(Sample.run_id == run.id)
            .order_by(Sample.step, Sample.group_index, Sample.sample_index)
        )
        groups: dict[tuple[int, int], list] = defaultdict(list)
        for sample in rows:
            groups[sample.step, sample.group_index].append(sample)
        lines = [_group_line(samples, run.id) for samples in groups.values()]
        return _save_file(
            session, settings, run.project_id, lines, f"{run.id}.rescore{rescore.number}.jsonl"
        )


def _group_line(samples: list, run_id: str) -> dict:
    """One group's samples (rows of samples' columns) as an offpolicy file line (a group of
    episodes as a chat group)."""
    sources = [run_id if s.source == POLICY else s.source for s in samples]
    if samples[0].episode is not None:  # episodes: a chat group of their turns
        line = {
            "messages": samples[0].episode["prompt_messages"],
            "episodes": [[recorded_message(t) for t in s.episode["turns"]] for s in samples],
        }
    else:
        line = {"prompt": samples[0].prompt, "completions": [s.completion for s in samples]}
    line |= {
        "rewards": [s.reward for s in samples],
        "source": sources[0] if len(set(sources)) == 1 else sources,
    }
    if samples[0].answer is not None:
        line["answer"] = samples[0].answer
    return line


def _save_file(
    session, settings: Settings, project_id: str, groups: list[dict], filename: str
) -> str:
    """Record `groups` as a file of purpose offpolicy of the project, as an upload of them
    would be recorded; returns its id."""
    for number, group in enumerate(groups, start=1):
        if problem := group_problem(group):  # made from stored samples: never expected
            raise RunError(f"re-scored group {number} is not an off-policy group: {problem}")
    settings.files_dir.mkdir(parents=True, exist_ok=True)
    file_id = new_id("file")
    path = settings.files_dir / f"{file_id}.jsonl"
    write_rows(path, groups)
    session.add(
        File(
            id=file_id,
            project_id=project_id,
            filename=filename,
            purpose=FilePurpose.OFFPOLICY,
            bytes=path.stat().st_size,
            rows=len(groups),
            fields=common_fields(groups),
            path=str(path),
        )
    )
    return file_id
