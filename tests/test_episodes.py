"""Multi-turn episodes in the run loop (in-process): the built-in secret_code environment."""

import json
import os

import pytest
from run_control import run_row
from sqlalchemy import select

from service.db import session_scope
from service.models import Metric, Sample
from workers.environments.builtin import secret_code_rows
from workers.execute import execute_run

from factories import submit

SECRET_CODE = {
    "environment": {"type": "builtin", "name": "secret_code", "max_turns": 2},
    "reward": {"type": "builtin", "name": "exact_match"},  # unused: the environment scores
    "algorithm": {"group_size": 8, "beta": 0.01},
    "sampling": {"max_new_tokens": 2},
    "optimizer": {"lr": 2e-3},
    "training": {"steps": 60, "prompts_per_step": 8, "mini_batches": 1},
    "checkpoint": {"every_steps": 60},
}


def metric(settings, run_id, name) -> list[float]:
    with session_scope(settings.resolved_database_url) as session:
        rows = session.scalars(
            select(Metric).where(Metric.run_id == run_id, Metric.name == name).order_by(Metric.step)
        ).all()
        return [m.value for m in rows]


@pytest.mark.parametrize("variant", json.loads(os.environ.get("SWEEP", "[{}]")))
def test_secret_code_learns(settings, tiny_model_dir, variant):
    spec = {**SECRET_CODE, **variant}
    run_id = submit(settings, tiny_model_dir, train_rows=secret_code_rows(64), **spec)
    assert execute_run(settings, run_id, "worker-a") == "succeeded", run_row(settings, run_id).error
    rewards = metric(settings, run_id, "reward/mean")
    print(variant, [round(sum(rewards[i : i + 20]) / 20, 2) for i in range(0, len(rewards), 20)])
    with session_scope(settings.resolved_database_url) as session:
        sample = session.scalars(select(Sample).where(Sample.run_id == run_id)).first()
        print(sample.prompt, sample.completion, sample.episode)
