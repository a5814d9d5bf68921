"""The loss dry-run: what one group of completions would teach a run's policy, before anyone
trains on it.

pi_theta is a checkpoint of the run (its latest by default) and pi_ref the model the run started
from (a LoRA checkpoint's base, with the adapter switched off), as reference="initial" sees
them. The API checks that run and checkpoint are the caller's, then a worker on the run's queue
loads the models and computes the numbers with the learner's own code (workers/dry_run.py): the
API process loads no model. Nothing is trained or stored.
"""

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.checkpoints.service import get_checkpoint
from service.config import Settings
from service.contract.tasks import DRY_RUN_TASK, DryRunOutput, DryRunTask, queue_of
from service.diagnostics.schemas import DryRunRequest, DryRunResult
from service.dispatch import ask_worker
from service.errors import Conflict
from service.models import Checkpoint, Project
from service.runs.service import get_run, run_spec

MAX_TOKENS = 65_536  # padded prompt + completion tokens over the whole group


def dry_run(
    session: Session, settings: Settings, project: Project, req: DryRunRequest
) -> DryRunResult:
    run = get_run(session, project, req.model.run_id)
    ckpt_id = req.model.checkpoint_id or session.scalar(
        select(Checkpoint.id)
        .where(Checkpoint.run_id == run.id)
        .order_by(Checkpoint.step.desc())
        .limit(1)
    )
    if ckpt_id is None:
        raise Conflict(f"run {run.id} has no checkpoint yet; name one of a run that has")
    ckpt = get_checkpoint(session, project, run.id, ckpt_id)
    task = DryRunTask(
        checkpoint_id=ckpt.id,
        checkpoint_path=ckpt.path,
        checkpoint_kind=ckpt.kind,
        base_model=run.model_folders["path"],
        prompt=req.prompt,
        completions=req.completions,
        messages=req.messages,
        tools=req.tools,
        episodes=req.episodes,
        chat_template=run_spec(run).model.chat_template,
        rewards=req.rewards,
        beta=req.beta,
        max_tokens=MAX_TOKENS,
    )
    run_id, step, queue = run.id, ckpt.step, queue_of(run.spec)
    session.commit()  # read all we need: hold no database connection while the worker works
    out = DryRunOutput.model_validate(
        ask_worker(settings, DRY_RUN_TASK, task, queue, "the dry run")
    )
    return DryRunResult(
        run_id=run_id,
        checkpoint_id=task.checkpoint_id,
        step=step,
        beta=req.beta,
        reward_mean=sum(req.rewards) / len(req.rewards),
        log_ratio_mean=out.log_ratio_mean,
        loss=out.loss,
        completions=out.completions,
    )
