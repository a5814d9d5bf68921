"""POST /v1/graders:validate and /v1/graders:run, through the official `openai` SDK
(`client.fine_tuning.alpha.graders`, at OpenAI's paths) and at our own, against the embedded
stack's real processes: the API, a worker that grades, and an inference worker whose vLLM
server (the CPU build) serves a checkpoint of the tiny model as a judge. A fake
OpenAI-compatible judge (tests/judge_server.py) answers chosen scores, fails first or always.

In process, with no worker: what the API refuses before grading (a judge's URL that may not
be called). The tiny model's judgements are noise: mostly no number, which must come back as
model_grader_parse_error with reward 0 and the tokens it used, never as a failed request.
"""

from types import SimpleNamespace

import httpx
import openai
import pytest

from factories import assert_error, auth, copy_rows, upload, wait_for_run
from judge_server import COMPLETION_TOKENS, PROMPT_TOKENS, JudgeServer, Judging
from services import cli, stack_settings, start_stack

LOAD_S = 600.0  # a model's first request: vLLM starts (tens of seconds on a loaded machine)
TRAIN_S = 300.0
KEY_VARIABLE, KEY = "GVPO_TEST_JUDGE_KEY", "sk-judge"
SPEC = {
    "algorithm": {"group_size": 2},
    "sampling": {"max_new_tokens": 4},
    "training": {"steps": 1, "prompts_per_step": 1, "mini_batches": 1},
    "checkpoint": {"every_steps": 1},
    "reward": {"type": "builtin", "name": "char_accuracy"},
}
STRING_CHECK = {
    "type": "string_check",
    "name": "exact",
    "input": "{{ sample.output_text }}",
    "reference": "{{ item.answer }}",
    "operation": "eq",
}
ITEM = {"answer": "abc"}


def judge_grader(model: str, **fields) -> dict:
    """A score_model grader whose prompt fits the tiny model's 256-token context."""
    return {
        "type": "score_model",
        "name": "judge",
        "model": model,
        "input": [
            {"role": "system", "content": "Score 0 to 10."},
            {"role": "user", "content": "{{ item.answer }} vs {{ sample.output_text }}"},
        ],
        "range": [0, 10],
        "sampling_params": {"max_completions_tokens": 8, "temperature": 1.0, "seed": 1},
        **fields,
    }


@pytest.fixture(scope="module")
def graded(tmp_path_factory, tiny_model_dir):
    """The stack (its worker may call loopback judges, and has the fake judge's key), a key of
    the project "graders" and of another, and a checkpoint of a one-step run of the tiny
    model."""
    settings = stack_settings(tmp_path_factory.mktemp("stack"), webhook_allow_private=True)
    cli(settings, "db", "upgrade")
    with pytest.MonkeyPatch.context() as env:
        env.setenv(KEY_VARIABLE, KEY)  # the stack's children take this process's environment
        stack = start_stack(settings, settings.resolved_data_dir / "logs")
    try:
        key = cli(settings, "api-key", "create", "--project", "graders")
        other = cli(settings, "api-key", "create", "--project", "others")
        http = httpx.Client(base_url=stack.url, headers=auth(key), timeout=LOAD_S)
        train = upload(http, None, copy_rows(16), filename="t.jsonl")
        body = {"model": {"path": str(tiny_model_dir)}, "dataset": {"train_file": train}, **SPEC}
        created = http.post("/v1/runs", json=body)
        assert created.status_code == 201, created.text
        run_id = created.json()["id"]
        wait_for_run(http, run_id, {"succeeded"}, TRAIN_S)
        (ckpt,) = http.get(f"/v1/runs/{run_id}/checkpoints").json()["data"]
        yield SimpleNamespace(
            stack=stack,
            http=http,
            train=train,
            ckpt=ckpt["id"],
            sdk=sdk(stack, key),
            other=sdk(stack, other),
        )
    finally:
        stack.stop()


def sdk(stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, timeout=LOAD_S, max_retries=0)


@pytest.mark.slow
def test_validate_answers_the_grader_or_names_each_problem(graded):
    graders = graded.sdk.fine_tuning.alpha.graders
    checked = graders.validate(grader=STRING_CHECK).grader
    assert (checked.type, checked.operation, checked.name) == ("string_check", "eq", "exact")
    # OpenAI's SDK types a multi grader's `graders` as one grader: keyed by its name here
    multi = {"type": "multi", "name": "m", "graders": STRING_CHECK, "calculate_output": "exact"}
    checked = graders.validate(grader=multi).grader.to_dict()
    assert checked["graders"]["exact"]["type"] == "string_check"
    judge = graders.validate(grader=judge_grader(graded.ckpt)).grader
    assert judge.model == graded.ckpt and judge.model_extra["max_attempts"] == 3  # filled in

    for bad, needle in (
        ({**STRING_CHECK, "input": "{{ row.answer }}"}, "may name only item and sample"),
        ({**multi, "calculate_output": "exact + other"}, "'other'"),
        ({**STRING_CHECK, "operation": "startswith"}, "operation"),
        ({"type": "label_model", "name": "l", "model": "m", "input": []}, "label_model"),
        (judge_grader("gpt-4o"), "give base_url"),
        ({**judge_grader(graded.ckpt), "range": [1, 0]}, "low < high"),
    ):
        with pytest.raises(openai.UnprocessableEntityError, match=needle):
            graders.validate(grader=bad)
    ours = graded.http.post("/v1/graders:validate", json={"grader": {**STRING_CHECK, "x": 1}})
    assert ours.status_code == 422 and ours.json()["error"]["details"]["fields"]

    in_multi = {**multi, "graders": judge_grader(graded.ckpt), "calculate_output": "judge"}
    for grader in (judge_grader(graded.ckpt), in_multi):
        with pytest.raises(openai.NotFoundError, match="no model"):  # another project's
            graded.other.fine_tuning.alpha.graders.validate(grader=grader)
        with pytest.raises(openai.NotFoundError, match="no model"):
            graded.other.fine_tuning.alpha.graders.run(grader=grader, model_sample="abc", item=ITEM)


@pytest.mark.slow
def test_a_judge_at_a_url_grades_one_sample(graded):
    replies = {"abc": '{"result": 0.8}', "abd": "I would say 0.3"}
    judging = Judging(answer=lambda m: replies[m[1]["content"].rsplit(" ", 1)[1]], key=KEY)
    with JudgeServer(judging) as server:
        grader = judge_grader(
            "fake-judge", base_url=server.url, api_key_env=KEY_VARIABLE, range=[0, 1]
        )
        result = graded.sdk.fine_tuning.alpha.graders.run(
            grader=grader, model_sample="abc", item=ITEM
        )
        ours = graded.http.post(
            "/v1/graders:run", json={"grader": grader, "model_sample": "abd", "item": ITEM}
        )
    assert result.reward == 0.8
    meta = result.metadata
    assert (meta.name, meta.type, meta.sampled_model_name) == ("judge", "score_model", "fake-judge")
    assert not any(v for v in meta.errors.model_dump().values())
    assert meta.token_usage == PROMPT_TOKENS + COMPLETION_TOKENS and meta.execution_time > 0
    assert result.api_model_grader_token_usage_per_model == {
        "fake-judge": {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": COMPLETION_TOKENS,
            "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
        }
    }
    assert judging.requests[0]["messages"][1]["content"] == "abc vs abc"
    assert ours.status_code == 200 and ours.json()["reward"] == 0.3


@pytest.mark.slow
def test_a_judge_is_retried_on_500_and_one_that_never_answers_is_a_server_error(graded):
    with JudgeServer(Judging(fail_first=2, scores=["1"])) as server:
        grader = judge_grader("fake-judge", base_url=server.url, max_attempts=3)
        result = graded.sdk.fine_tuning.alpha.graders.run(
            grader=grader, model_sample="abc", item=ITEM
        )
        assert server.judging.calls == 3
    assert result.reward == 1.0 and not result.metadata.errors.api_model_grader_server_error

    with JudgeServer(Judging(fail_always=True)) as server:
        grader = judge_grader("fake-judge", base_url=server.url, max_attempts=2)
        result = graded.sdk.fine_tuning.alpha.graders.run(
            grader=grader, model_sample="abc", item=ITEM
        )
        assert server.judging.calls == 2
    errors = result.metadata.errors
    assert result.reward == 0.0 and errors.api_model_grader_server_error
    assert "failed after 2 tries" in errors.api_model_grader_server_error_details
    assert "HTTP 500" in errors.api_model_grader_server_error_details


@pytest.mark.slow
def test_our_own_checkpoint_judges_over_http(graded):
    """The tiny model, served by the inference worker, answers; what it says is noise: a
    score within range, or a parse error with reward 0, each with the tokens it used."""
    graders = graded.sdk.fine_tuning.alpha.graders
    results = [
        graders.run(grader=judge_grader(graded.ckpt), model_sample=sample, item=ITEM)
        for sample in ("abc", "xyz", "a")
    ]
    for result in results:
        meta = result.metadata
        assert meta.sampled_model_name == graded.ckpt
        assert meta.token_usage > 0
        assert set(result.api_model_grader_token_usage_per_model) == {graded.ckpt}
        assert not meta.errors.api_model_grader_server_error, meta.errors
        if meta.errors.api_model_grader_parse_error:
            assert result.reward == 0.0 and meta.model_extra["detail"]
        else:
            assert 0 <= result.reward <= 10


@pytest.mark.slow
def test_a_run_rewarded_by_our_own_judge_succeeds(graded, tiny_model_dir):
    """The judge in a run: the run's worker asks the inference worker for the checkpoint and
    grades every completion by it; the judge's parse errors are counted, not fatal."""
    body = {
        "model": {"path": str(tiny_model_dir)},
        "dataset": {"train_file": graded.train},
        **SPEC,
        "training": {"steps": 2, "prompts_per_step": 1, "mini_batches": 1},
        "reward": judge_grader(graded.ckpt),
    }
    created = graded.http.post("/v1/runs", json=body)
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]
    run = wait_for_run(graded.http, run_id, {"succeeded", "failed"}, TRAIN_S + LOAD_S)
    assert run["status"] == "succeeded", run["error"]
    metrics = graded.http.get(f"/v1/runs/{run_id}/metrics").json()["metrics"]
    assert len(metrics["reward/mean"]) == 2
    errors = [value for _, value in metrics["reward/errors"]]  # of 2 completions a step
    assert len(errors) == 2 and all(0 <= e <= 2 for e in errors)
    events = graded.http.get(f"/v1/runs/{run_id}/events").json()["data"]
    noted = [e for e in events if e["type"] == "reward.grader_errors"]
    assert len(noted) == sum(1 for e in errors if e)  # one per step with errors
    for event in noted:
        assert event["data"]["kind"] == "model_grader_parse_error", event


def test_a_judge_url_that_may_not_be_called_is_named(api, make_key):
    """Checked in the API as a run's webhooks are (no worker needed: nothing is graded)."""
    key = make_key()
    url_judge = judge_grader("m", base_url="http://127.0.0.1:9/v1")
    multi = {"type": "multi", "graders": {"j": url_judge}, "calculate_output": "j"}
    for path, body in (
        ("/v1/graders:validate", {"grader": url_judge}),
        ("/v1/fine_tuning/alpha/graders/validate", {"grader": multi}),
        ("/v1/graders:run", {"grader": url_judge, "model_sample": "a"}),
    ):
        error = assert_error(
            api.post(path, headers=auth(key), json=body), 422, "invalid_request", "loopback"
        )
        assert error["details"]["fields"][0]["field"] in (
            "grader.base_url",
            "grader.graders.j.base_url",
        )
