"""Whose models a grader's judges are: every ckpt_… or run_… a score_model grader names must be
the caller's project's, wherever a grader comes in (a run's reward, a rescore's, a grader run or
validation); another project's is a 404 as serving answers it."""

from typing import Any

from sqlalchemy.orm import Session

from service.contract.graders import served_judges
from service.contract.serving import unknown
from service.errors import NotFound
from service.models import Checkpoint, Project, Run


def check_judges(session: Session, project: Project, spec: Any) -> None:
    """NotFound unless every model of ours that the judges of `spec` (a grader, or a reward
    that holds graders) name is the project's."""
    for name in served_judges(spec):
        ckpt = session.get(Checkpoint, name) if name.startswith("ckpt_") else None
        run_id = ckpt.run_id if ckpt is not None else name
        run = session.get(Run, run_id) if run_id.startswith("run_") else None
        if run is None or run.project_id != project.id:
            raise NotFound(unknown(name).message)
