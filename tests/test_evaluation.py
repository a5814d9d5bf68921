"""Evaluation during training: pass@k by the unbiased estimator against hand-computed values,
and eval metrics recorded at the configured steps and at the end of a run."""

import math

import pytest
import torch
from sqlalchemy import select

from service.db import session_scope
from service.models import Metric, RunEvent
from workers.evaluation import eval_metrics, pass_at_k
from workers.execute import execute_run

from factories import copy_rows, submit, webhook_secret
from reward_server import Behaviour, RewardServer

EVAL_METRICS = ["eval/pass@1", "eval/pass@k", "eval/reward_mean"]


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (5, 2, 1, 2 / 5),  # pass@1 is the pass rate
        (10, 3, 4, 1 - 35 / 210),  # 1 - C(7,4)/C(10,4)
        (4, 0, 2, 0.0),  # nothing passes
        (4, 3, 2, 1.0),  # fewer than k fail: any k include a pass
        (4, 4, 4, 1.0),
        (6, 1, 6, 1.0),
    ],
)
def test_pass_at_k_matches_the_combinatorial_formula(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_k_is_not_the_naive_estimate():
    # The naive "any of the first k passed" depends on order; the estimator averages over all
    # k-subsets: with the one pass in last place, the first two never include it, yet
    # pass@2 = 1 - C(3,2)/C(4,2) = 1/2.
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)


@pytest.mark.parametrize(("n", "c", "k"), [(4, 1, 5), (4, 5, 2), (4, 1, 0)])
def test_pass_at_k_refuses_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass@k needs"):
        pass_at_k(n, c, k)


def test_eval_metrics_on_a_hand_computed_batch():
    rewards = torch.tensor(
        [
            [1.0, 0.0, 1.0, 0.0, 0.0],  # c = 2 of 5
            [0.0, 0.5, 0.0, 0.9, 0.0],  # c = 0 (below the threshold)
            [1.0, 1.0, 1.0, 1.0, 1.0],
        ]
    )  # c = 5
    got = eval_metrics(rewards, threshold=1.0, k=2)
    assert got["eval/pass@1"] == pytest.approx((2 / 5 + 0 + 1) / 3)
    assert got["eval/pass@k"] == pytest.approx((0.7 + 0 + 1) / 3)
    assert got["eval/reward_mean"] == pytest.approx(rewards.mean().item())
    # a lower threshold counts the partial rewards as passes
    assert eval_metrics(rewards, threshold=0.5, k=2)["eval/pass@1"] == pytest.approx(
        (2 / 5 + 2 / 5 + 1) / 3
    )


def eval_series(settings, run_id) -> dict[str, list[tuple[int, float]]]:
    with session_scope(settings.resolved_database_url) as session:
        rows = session.execute(
            select(Metric.name, Metric.step, Metric.value)
            .where(Metric.run_id == run_id, Metric.name.like("eval/%"))
            .order_by(Metric.name, Metric.step)
        ).all()
    series: dict[str, list[tuple[int, float]]] = {}
    for name, step, value in rows:
        series.setdefault(name, []).append((step, value))
    return series


@pytest.mark.both_backends
@pytest.mark.parametrize(
    ("steps", "expected"),
    [(6, [2, 4, 6]), (5, [2, 4, 5])],
    ids=["last-on-schedule", "final-off-schedule"],
)
def test_eval_metrics_at_the_configured_steps_and_at_the_end(
    settings, tiny_model_dir, steps, expected
):
    # a 0/1 reward: pass@1 (threshold 1) is then the mean reward, a check on both
    run_id = submit(
        settings,
        tiny_model_dir,
        reward={"type": "builtin", "name": "regex", "params": {"pattern": "[a-z]"}},
        eval_rows=copy_rows(5),
        training={"steps": steps},
        eval={"every_steps": 2, "samples_per_prompt": 6, "k": 3},
    )
    assert execute_run(settings, run_id, "worker-a") == "succeeded"
    series = eval_series(settings, run_id)
    assert sorted(series) == EVAL_METRICS
    for name in EVAL_METRICS:
        assert [s for s, _ in series[name]] == expected, name
    for (_, p1), (_, pk), (_, mean) in zip(*(series[n] for n in EVAL_METRICS), strict=True):
        assert p1 == pytest.approx(mean) and p1 <= pk <= 1.0
    with session_scope(settings.resolved_database_url) as session:
        final = session.scalars(
            select(RunEvent).where(RunEvent.run_id == run_id, RunEvent.type == "eval.final")
        ).one()
    assert final.data["step"] == steps and final.data["k"] == 3 and final.data["prompts"] == 5
    assert final.data["eval/pass@k"] == series["eval/pass@k"][-1][1]


def test_no_eval_file_no_eval_metrics(settings, tiny_model_dir):
    run_id = submit(settings, tiny_model_dir, training={"steps": 2}, eval={"every_steps": 1})
    assert execute_run(settings, run_id, "worker-a") == "succeeded"
    assert eval_series(settings, run_id) == {}


def test_max_prompts_limits_the_eval_set(settings, tiny_model_dir):
    run_id = submit(
        settings,
        tiny_model_dir,
        eval_rows=copy_rows(9),
        training={"steps": 2},
        eval={"every_steps": 2, "samples_per_prompt": 2, "max_prompts": 3},
    )
    assert execute_run(settings, run_id, "worker-a") == "succeeded"
    with session_scope(settings.resolved_database_url) as session:
        final = session.scalars(
            select(RunEvent).where(RunEvent.run_id == run_id, RunEvent.type == "eval.final")
        ).one()
    assert final.data["prompts"] == 3


def test_a_webhook_scores_eval_completions_as_their_own_batch(settings, tiny_model_dir):
    settings = settings.model_copy(update={"webhook_allow_private": True})
    behaviour = Behaviour()
    with RewardServer(behaviour) as server:
        run_id = submit(
            settings,
            tiny_model_dir,
            eval_rows=copy_rows(3),
            reward={"type": "webhook", "url": server.url, "timeout_s": 10},
            training={"steps": 4},
            eval={"every_steps": 2, "samples_per_prompt": 2},
        )
        behaviour.secret = webhook_secret(settings, run_id)
        assert execute_run(settings, run_id, "worker-a") == "succeeded"
    # 4 training steps and 2 evaluations (after steps 2 and 4), one request each
    assert behaviour.purposes == ["train", "train", "eval", "train", "train", "eval"]
    run = run_id.removeprefix("run_")
    for step in (2, 4):
        ids = [f"smp_{run}_eval{step}_{g}_{i}" for g in range(3) for i in range(2)]
        rewards = [behaviour.rewards[sid] for sid in ids]  # KeyError if the ids were others
        reward_mean = dict(eval_series(settings, run_id)["eval/reward_mean"])[step]
        assert reward_mean == pytest.approx(sum(rewards) / len(rewards))
    assert f"smp_{run}_2_0_0" in behaviour.rewards  # the training batch of step 2, apart
