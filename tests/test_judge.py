"""score_model on the worker (workers/graders/judge.py), in process: the score read from what a
judge answers; a judge at a base_url (a fake OpenAI-compatible server over loopback HTTP,
tests/judge_server.py) given each sample's rendered messages, its key and sampling
parameters, concurrently; parse errors, refusals and a judge's 4xx as that sample's error;
retries on 500 and a judge that never answers failing as a run would; and our own models as
judges refused when they are another project's, or when no inference worker serves them.
tests/test_graders_api.py grades with our own served checkpoint over real HTTP."""

import pytest

from service.contract.graders import ScoreModelGrader
from service.db import session_scope
from service.models import Checkpoint, Run
from workers.errors import RunError
from workers.graders.base import BUILDERS, GradeError, GradingContext, Sample
from workers.graders.judge import parse_score
from workers.graders.served import JudgeFailed

from factories import submit
from judge_server import COMPLETION_TOKENS, PROMPT_TOKENS, JudgeServer, Judging

MESSAGES = [
    {"role": "developer", "content": 'Grade the answer; say {"result": score}.'},
    {
        "role": "user",
        "content": [
            {"type": "input_text", "text": "Expected: {{ item.answer }}"},
            {"type": "input_text", "text": "Answer: {{ sample.output_text }}"},
        ],
    },
]


@pytest.mark.parametrize(
    ("text", "score"),
    [
        ('{"result": 0.7}', 0.7),
        ('{"steps": ["fine"], "result": 1}', 1.0),
        ('Reasoning first.\n```json\n{"result": 0.25}\n```', 0.25),
        ('{"result": "0.5"}', 0.5),
        ("8/10", 8.0),
        ("score: -3e-1 overall", -0.3),
        ('{"score": 0.4, "steps": 2}', 0.4),  # no result: the first number
        (".5", 0.5),
        ("I cannot grade this", None),
        ("", None),
        ("true", None),
    ],
)
def test_the_score_is_the_json_result_else_the_first_number(text, score):
    assert parse_score(text) == score


def judge(url: str | None, settings, project_id: str = "", retries=None, **fields):
    """The score_model grader of `fields`, built as a run builds it."""
    spec = ScoreModelGrader.model_validate(
        {
            "type": "score_model",
            "name": "judge",
            "model": "fake-judge",
            "input": MESSAGES,
            **({"base_url": url} if url else {}),
            **fields,
        }
    )
    on_retry = (
        (lambda message, data: retries.append((message, data))) if retries is not None else None
    )
    context = GradingContext(settings, project_id, **({"on_retry": on_retry} if on_retry else {}))
    return BUILDERS["score_model"](spec, context)


def pairs(*texts: str, answer: str = "abc") -> list:
    return [(Sample.of(t), {"answer": answer}) for t in texts]


@pytest.fixture
def local(settings):
    """The settings of a worker that may call loopback judges."""
    return settings.model_copy(update={"webhook_allow_private": True})


def test_each_sample_is_judged_by_its_rendered_messages(local, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    scores = {"abc": '{"result": 1.0}', "abd": "0.5, since one letter is wrong", "x": "0"}

    def answer(messages: list[dict]) -> str:
        return scores[messages[1]["content"].rsplit("Answer: ", 1)[1]]

    with JudgeServer(Judging(answer=answer, key="sk-test")) as server:
        grades = judge(
            server.url,
            local,
            api_key_env="JUDGE_KEY",
            sampling_params={"max_completions_tokens": 20, "temperature": 0.5, "seed": 3},
        ).grade(pairs("abc", "abd", "x"))
        sent = server.judging.requests
    assert [g.reward for g in grades] == [1.0, 0.5, 0.0]
    assert all(g.error is None for g in grades)
    total = PROMPT_TOKENS + COMPLETION_TOKENS
    assert {(g.model, g.token_usage) for g in grades} == {("fake-judge", total)}
    assert grades[0].usage == {
        "fake-judge": {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": COMPLETION_TOKENS,
            "total_tokens": total,
        }
    }
    first = next(b for b in sent if b["messages"][1]["content"].endswith("abc"))
    assert first == {
        "model": "fake-judge",
        "messages": [
            {"role": "developer", "content": 'Grade the answer; say {"result": score}.'},
            {"role": "user", "content": "Expected: abc\nAnswer: abc"},
        ],
        "max_completion_tokens": 20,
        "temperature": 0.5,
        "seed": 3,
    }


def test_no_score_a_score_out_of_range_and_a_refusal_are_that_samples_error(local):
    replies = {"a": "7", "b": "no idea", "c": '{"result": 3}', "d": '{"result": 0.25}'}
    with JudgeServer(Judging(answer=lambda m: replies[m[1]["content"][-1]])) as server:
        grades = judge(server.url, local, range=[0, 5]).grade(pairs(*replies))
    assert [(g.reward, g.error) for g in grades] == [
        (0.0, GradeError.MODEL_PARSE),
        (0.0, GradeError.MODEL_PARSE),
        (3.0, None),
        (0.25, None),
    ]
    assert "outside range [0, 5]" in grades[0].detail and "no idea" in grades[1].detail
    assert grades[0].token_usage == PROMPT_TOKENS + COMPLETION_TOKENS  # counted all the same

    with JudgeServer(Judging(refusal="I will not grade this")) as server:
        (refused,) = judge(server.url, local).grade(pairs("a"))
    assert (refused.reward, refused.error) == (0.0, GradeError.MODEL_REFUSAL)
    assert "will not grade" in refused.detail


def test_a_template_naming_what_the_row_lacks_is_that_samples_error(local):
    with JudgeServer(Judging()) as server:
        grades = judge(
            server.url, local, input=[{"role": "user", "content": "{{ item.missing }}"}]
        ).grade(pairs("a", "b"))
        assert server.judging.calls == 0
    assert {(g.reward, g.error) for g in grades} == {(0.0, GradeError.INVALID_VARIABLE)}
    assert "missing" in grades[0].detail


def test_a_judges_400_is_that_samples_error_and_401_fails_at_once(local, monkeypatch):
    with JudgeServer(Judging(status=400)) as server:
        grades = judge(server.url, local).grade(pairs("a", "b"))
    assert {g.error for g in grades} == {GradeError.MODEL_SERVER}
    assert "HTTP 400" in grades[0].detail

    monkeypatch.setenv("JUDGE_KEY", "wrong")
    with JudgeServer(Judging(key="right")) as server:
        with pytest.raises(JudgeFailed, match="HTTP 401.*api_key_env"):
            judge(server.url, local, api_key_env="JUDGE_KEY").grade(pairs("a"))
        assert server.judging.calls == 1  # not retried
    with pytest.raises(JudgeFailed, match="no environment variable NOT_SET"):
        judge(server.url, local, api_key_env="NOT_SET").grade(pairs("a"))


def test_a_judge_is_retried_on_500_then_answers(local):
    retries = []
    with JudgeServer(Judging(fail_first=2, scores=["0.5"])) as server:
        (grade,) = judge(server.url, local, retries=retries, max_attempts=3).grade(pairs("a"))
        assert server.judging.calls == 3
    assert (grade.reward, grade.error) == (0.5, None)
    assert [d["attempt"] for _, d in retries] == [1, 2]
    assert "HTTP 500" in retries[0][0] and "retry 1 of 2" in retries[0][0]


def test_a_judge_failing_every_try_fails_as_a_run_would(local):
    retries = []
    with JudgeServer(Judging(fail_always=True)) as server:
        with pytest.raises(JudgeFailed, match="failed after 2 tries; last answer: HTTP 500") as err:
            judge(server.url, local, retries=retries, max_attempts=2).grade(pairs("a", "b", "c"))
        assert server.judging.calls <= 6
    assert isinstance(err.value, RunError) and server.url in str(err.value)
    assert len(retries) == 1  # one report per round, not one per sample


def test_a_batch_is_judged_concurrently(local):
    with JudgeServer(Judging(delay_s=0.3, scores=["1"])) as server:
        grades = judge(server.url, local).grade(pairs(*"abcdefgh"))
        assert server.judging.most_in_flight > 1
    assert [g.reward for g in grades] == [1.0] * 8


def test_a_judge_at_a_private_address_is_refused_unless_allowed(settings):
    with JudgeServer(Judging()) as server:
        with pytest.raises(JudgeFailed, match="may not be called.*ALLOW_PRIVATE"):
            judge(server.url, settings).grade(pairs("a"))
        assert server.judging.calls == 0


def test_our_own_models_must_be_the_projects_and_served(settings, tiny_model_dir):
    run_id, fresh = submit(settings, tiny_model_dir), submit(settings, tiny_model_dir)
    ckpt = f"ckpt_{run_id[4:]}_1"
    with session_scope(settings.resolved_database_url) as session:
        row = Checkpoint(id=ckpt, run_id=run_id, step=1, path=str(tiny_model_dir))
        row.bytes = 1
        session.add(row)
        project_id = session.get(Run, run_id).project_id

    with pytest.raises(JudgeFailed, match="no model"):
        judge(None, settings, "prj_other", model=ckpt).grade(pairs("a"))
    retries = []
    with pytest.raises(JudgeFailed, match="after 2 tries.*gvpo serve"):
        judge(None, settings, project_id, retries, model=ckpt, max_attempts=2).grade(pairs("a"))
    assert "no inference worker" in retries[0][0]
    with pytest.raises(JudgeFailed, match="after 2 tries.*has not started"):
        judge(None, settings, project_id, model=fresh, max_attempts=2).grade(pairs("a"))


def test_a_judge_model_that_is_not_ours_needs_a_base_url():
    with pytest.raises(ValueError, match="give base_url"):
        ScoreModelGrader.model_validate(
            {"type": "score_model", "model": "gpt-4o", "input": MESSAGES}
        )
