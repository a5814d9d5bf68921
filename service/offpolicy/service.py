"""Groups posted to a run while it goes (POST /v1/runs/{id}/groups).

A posted group is an off-policy group like a line of an offpolicy file (service/contract/groups.py)
and fills the run's off-policy slots (training.offpolicy_fraction of each step) before the run's
offpolicy file does: the worker takes them oldest first at the next step. A run that has no
off-policy slots, or has ended, refuses them (409), since nothing would ever train them.
"""

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.config import Settings
from service.contract.events import EventType
from service.contract.groups import fit_problem, group_problem
from service.contract.spec import RunSpec, offpolicy_per_engine
from service.contract.states import TERMINAL
from service.errors import Conflict, InvalidSpec
from service.models import Project, Run, RunGroup
from service.models.run_event import add_event
from service.offpolicy.schemas import GroupsStatus
from service.offpolicy.traffic import is_traffic, resolve_traffic, traffic_problem
from service.runs.preflight import check_posted_groups
from service.runs.service import get_run, run_spec
from service.runs.sources import loaded_spec

MAX_PENDING = 100_000  # posted groups a run holds untrained


def _slots(spec: RunSpec) -> int:
    """Off-policy slots in each of the run's steps (over all its rollout engines)."""
    fraction = spec.training.offpolicy_fraction
    engines = spec.resources.ranks // spec.rollout.tensor_parallel_size
    return offpolicy_per_engine(spec.training, engines) * engines if fraction else 0


def _counts(session: Session, run_id: str) -> tuple[int, int]:
    """(pending, trained) posted groups of the run."""
    rows = dict(
        session.execute(
            select(RunGroup.taken_step.is_(None), func.count())
            .where(RunGroup.run_id == run_id)
            .group_by(RunGroup.taken_step.is_(None))
        ).all()
    )
    return rows.get(True, 0), rows.get(False, 0)


def groups_status(session: Session, project: Project, run_id: str) -> GroupsStatus:
    run = get_run(session, project, run_id)
    return _status(session, run, run_spec(run))


def _status(session: Session, run: Run, spec: RunSpec, accepted: int = 0) -> GroupsStatus:
    pending, trained = _counts(session, run.id)
    return GroupsStatus(
        run_id=run.id,
        accepted=accepted,
        pending=pending,
        trained=trained,
        slots_per_step=_slots(spec),
    )


def post_groups(
    session: Session,
    settings: Settings,
    project: Project,
    run_id: str,
    groups: list[dict[str, Any]],
) -> GroupsStatus:
    run = get_run(session, project, run_id)
    if run.status in TERMINAL:
        raise Conflict(f"run {run.id} is {run.status}: nothing would train these groups")
    spec = run_spec(run)
    if not _slots(spec):
        raise Conflict(
            f"run {run.id} has no off-policy slots (training.offpolicy_fraction is "
            "0): submit a run with an offpolicy_fraction above 0 to post groups"
        )
    k, ranks = spec.algorithm.group_size, spec.resources.ranks
    traffic = [(i, g) for i, g in enumerate(groups) if is_traffic(g)]
    bad = [
        {"field": f"groups.{i}", "message": problem}
        for i, group in enumerate(groups)
        if (
            problem := traffic_problem(group, k)
            if is_traffic(group)
            else group_problem(group) or fit_problem(group, k, ranks)
        )
    ]
    if bad:
        raise InvalidSpec(bad)
    if len(traffic) < len(groups):
        check_posted_groups(
            settings, loaded_spec(spec, run), [g for g in groups if not is_traffic(g)]
        )
    if traffic:
        stored, bad = resolve_traffic(session, project, run, traffic)
        if bad:
            raise InvalidSpec(bad)
        made = iter(stored)
        groups = [next(made) if is_traffic(g) else g for g in groups]
    pending, _ = _counts(session, run.id)
    if pending + len(groups) > MAX_PENDING:
        raise Conflict(
            f"run {run.id} already holds {pending} untrained groups; at most "
            f"{MAX_PENDING} may wait: post more once steps have taken some"
        )
    session.add_all(RunGroup(run_id=run.id, body=group) for group in groups)
    add_event(
        session,
        run.id,
        EventType.GROUPS_POSTED,
        f"{len(groups)} groups posted for the run's off-policy slots",
        data={"groups": len(groups)},
    )
    session.flush()
    return _status(session, run, spec, accepted=len(groups))
