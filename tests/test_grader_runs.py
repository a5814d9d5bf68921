"""Runs whose reward is one of OpenAI's graders, on the tiny model: a `multi` grader over a file
where some rows lack the field a template names (their samples count as reward/errors and
show in an event, and the run succeeds), a re-scoring with a grader that reads the rows'
fields again, and what submission checks of a grader reward."""

import pytest
from rapidfuzz import fuzz
from sqlalchemy import select

from service.db import session_scope
from service.errors import InvalidSpec, NotFound
from service.models import Metric, RunEvent, Sample
from workers.execute import execute_run
from workers.rescore import execute_rescore

from factories import EXACT_MATCH, auth, copy_rows, submit

STEPS = 2

REWARD = {
    "type": "multi",
    "graders": {
        "has": {
            "type": "string_check",
            "input": "{{ sample.output_text }}",
            "reference": "{{ item.answer }}",
            "operation": "like",
        },
        "close": {
            "type": "text_similarity",
            "input": "{{ sample.output_text }}",
            "reference": "{{ item.prompt }}",
            "evaluation_metric": "fuzzy_match",
        },
    },
    "calculate_output": "0.5 * has + 0.5 * close ^ 2",
}


def rows() -> list[dict]:
    """The copy task, every other row without its answer."""
    out = copy_rows(16)
    for row in out[::2]:
        del row["answer"]
    return out


def expected(s: Sample) -> float:
    if s.answer is None:
        return 0.0  # {{ item.answer }} names a field its row lacks
    close = fuzz.ratio(s.completion, s.prompt) / 100
    return 0.5 * float(s.answer in s.completion) + 0.5 * close**2


def stored(settings, model, run_id: str, *where) -> list:
    with session_scope(settings.resolved_database_url) as session:
        found = session.scalars(select(model).where(model.run_id == run_id, *where)).all()
        for row in found:
            session.expunge(row)
        return found


@pytest.fixture
def graded_run(settings, tiny_model_dir) -> str:
    run_id = submit(
        settings,
        tiny_model_dir,
        reward=REWARD,
        train_rows=rows(),
        eval_rows=rows()[:4],  # evaluated after the last step
        training={"steps": STEPS},
    )
    assert execute_run(settings, run_id, "worker-a") == "succeeded"
    return run_id


def test_a_multi_grader_trains_a_run_and_counts_the_samples_it_could_not_grade(
    settings, graded_run
):
    samples = stored(settings, Sample, graded_run)
    assert samples and all(s.reward == pytest.approx(expected(s)) for s in samples)
    metrics = stored(settings, Metric, graded_run)
    errors = {m.step: m.value for m in metrics if m.name == "reward/errors"}
    missing = {
        step: sum(s.answer is None for s in samples if s.step == step)
        for step in range(1, STEPS + 1)
    }
    assert errors == missing and sum(missing.values()) > 0
    assert {"reward/has/mean", "reward/close/mean"} <= {m.name for m in metrics}
    events = stored(settings, RunEvent, graded_run, RunEvent.type == "reward.grader_errors")
    training = [e for e in events if e.data["purpose"] == "train"]
    assert sorted(e.data["step"] for e in training) == [s for s, n in missing.items() if n]
    for event in training:
        assert event.level == "warning" and event.data["count"] == missing[event.data["step"]]
        assert event.data["kind"] == "invalid_variable_error"
        assert event.data["detail"].startswith("has: ") and "answer" in event.data["detail"]
    # the evaluation's 4 prompts, 2 without an answer, 4 completions each
    (evaluation,) = [e for e in events if e.data["purpose"] == "eval"]
    assert evaluation.data["step"] == STEPS and evaluation.data["count"] == 2 * 4
    assert "eval/reward_mean" in {m.name for m in metrics}


def test_only_a_reward_that_reads_the_answer_needs_it_in_every_row(settings, tiny_model_dir):
    with pytest.raises(InvalidSpec) as refused:
        submit(settings, tiny_model_dir, reward=EXACT_MATCH, train_rows=rows())
    assert [f["field"] for f in refused.value.details["fields"]] == ["dataset.answer_field"]


def test_a_rescore_with_a_grader_reads_the_rows_fields(settings, graded_run, api, make_key):
    reward = {
        "type": "text_similarity",
        "input": "{{ sample.output_text }}",
        "reference": "{{ item.prompt }}{{ item.answer }}",
        "evaluation_metric": "fuzzy_match",
    }
    resp = api.post(
        f"/v1/runs/{graded_run}/rescore", headers=auth(make_key("loop")), json={"reward": reward}
    )
    assert resp.status_code == 202, resp.text
    assert execute_rescore(settings, resp.json()["id"], "worker-a") == "succeeded"
    for s in stored(settings, Sample, graded_run):
        if s.answer is None:
            assert s.reward == 0.0
        else:
            assert s.reward == pytest.approx(fuzz.ratio(s.completion, s.prompt + s.answer) / 100)
    events = stored(settings, RunEvent, graded_run, RunEvent.type == "reward.grader_errors")
    assert {e.data["purpose"] for e in events} == {"train", "eval", "rescore"}


def test_a_graders_endpoint_must_be_one_the_worker_may_call(settings, tiny_model_dir):
    cosine = {
        "type": "text_similarity",
        "input": "{{ sample.output_text }}",
        "reference": "{{ item.answer }}",
        "evaluation_metric": "cosine",
        "embeddings": {"base_url": "http://127.0.0.1:9/v1", "model": "m"},
    }
    reward = {"type": "multi", "graders": {"near": cosine}, "calculate_output": "near"}
    with pytest.raises(InvalidSpec) as refused:
        submit(settings, tiny_model_dir, reward=reward)
    (problem,) = refused.value.details["fields"]
    assert problem["field"] == "reward.graders.near.embeddings.base_url"
    assert "127.0.0.1" in problem["message"]


def test_a_run_whose_judge_is_not_one_of_the_projects_models_is_refused(settings, tiny_model_dir):
    judge = {
        "type": "score_model",
        "model": "ckpt_0123456789abcdef01234567_1",
        "input": [{"role": "user", "content": "Score: {{ sample.output_text }}"}],
    }
    reward = {"type": "composite", "components": [{**judge, "weight": 1.0}]}
    with pytest.raises(NotFound) as refused:
        submit(settings, tiny_model_dir, reward=reward)
    assert "ckpt_0123456789abcdef01234567_1" in refused.value.message
