"""Built-in verifiers and composite rewards: values, parameters, and their metrics in a run."""

import pytest

from service.contract.spec import RunSpec
from service.db import session_scope
from workers.execute import execute_run
from workers.rewards.builtin import get_reward

from factories import submit


def reward(name: str, completion: str, answer: str | None, **params) -> float:
    builtin = get_reward(name)
    return builtin.fn(completion, answer, builtin.params.model_validate(params))


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("42", "42", 1.0),
        ("  42 \n", "42", 1.0),
        ("a  b", "a b", 1.0),
        ("43", "42", 0.0),
        ("42", None, 0.0),
    ],
)
def test_exact_match_normalises_whitespace(completion, answer, expected):
    assert reward("exact_match", completion, answer) == expected


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("so the result is \\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("Adding them up.\nFinal answer: 42", "42", 1.0),
        ("The answer is $2x+2$", "$2(x+1)$", 1.0),
        ("\\boxed{(x-1)(x+1)}", "$x^2-1$", 1.0),
        ("\\boxed{3}", "4", 0.0),
        ("no number here", "4", 0.0),
    ],
)
def test_math_verify_extracts_and_compares(completion, answer, expected):
    assert reward("math_verify", completion, answer) == expected


def test_regex_one_pattern_or_the_share_of_several():
    assert reward("regex", "Answer: 12", None, pattern=r"Answer: \d+") == 1.0
    assert reward("regex", "no", None, pattern=r"Answer: \d+") == 0.0
    assert reward(
        "regex", "<think>x</think> 12", None, pattern=["<think>", "</think>", r"Answer:"]
    ) == pytest.approx(2 / 3)
    long = r"(?:Answer|Result|Final answer|The answer is): *-?\d+(?:\.\d+)?(?: units)?"
    assert len(long) > 64 and reward("regex", "Result: 12", None, pattern=long) == 1.0


def test_length_penalty_only_past_the_target():
    assert reward("length_penalty", "x" * 10, None, target=10) == 0.0
    assert reward("length_penalty", "x" * 15, None, target=10, scale=2.0) == pytest.approx(-1.0)


@pytest.mark.parametrize(
    ("rew", "needle"),
    [
        ({"type": "builtin", "name": "regex"}, "params.pattern: Field required"),
        ({"type": "builtin", "name": "regex", "params": {"pattern": "("}}, "not a valid regular"),
        ({"type": "builtin", "name": "length_penalty", "params": {"target": 0}}, "params.target"),
        ({"type": "builtin", "name": "exact_match", "params": {"x": 1}}, "params.x"),
        ({"type": "composite", "components": []}, "at least 1 item"),
    ],
)
def test_bad_reward_params_are_refused_at_submit(rew, needle):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=needle):
        RunSpec.model_validate(
            {"model": {"path": "m"}, "dataset": {"train_file": "f"}, "reward": rew}
        )


def test_composite_rewards_are_weighted_and_reported(settings, tiny_model_dir):
    from sqlalchemy import select

    from service.models import Metric, Sample

    composite = {
        "type": "composite",
        "components": [
            {"type": "builtin", "name": "char_accuracy", "weight": 1.0},
            {
                "type": "builtin",
                "name": "length_penalty",
                "params": {"target": 2},
                "weight": 0.5,
                "label": "short",
            },
        ],
    }
    run_id = submit(settings, tiny_model_dir, reward=composite, training={"steps": 2})
    assert execute_run(settings, run_id, "worker-a") == "succeeded"
    with session_scope(settings.resolved_database_url) as session:
        names = set(session.scalars(select(Metric.name).where(Metric.run_id == run_id)))
        samples = session.scalars(select(Sample).where(Sample.run_id == run_id)).all()
    assert {"reward/char_accuracy/mean", "reward/short/mean"} <= names
    for s in samples:
        expected = reward("char_accuracy", s.completion, s.answer) + 0.5 * reward(
            "length_penalty", s.completion, None, target=2
        )
        assert s.reward == pytest.approx(expected, abs=1e-6)
