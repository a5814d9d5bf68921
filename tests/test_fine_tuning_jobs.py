"""OpenAI's fine-tuning jobs (service/fine_tuning) through the official `openai` SDK, unchanged
but for base_url and api_key: files of purpose fine-tune, reinforcement jobs mapped to GVPO
runs, listing, events, checkpoints, pause, resume and cancel, and what is refused. The API
alone, served in this process, for what needs no worker; the embedded stack, whose worker
grades and trains, for jobs that run to their end."""

import io
import json
from datetime import timedelta

import httpx
import openai
import pytest
from openai import OpenAI
from sqlalchemy import select

from service.db import session_scope
from service.models import Checkpoint, Metric, Project, Run
from service.models.base import utcnow
from service.registry.service import register_model
from service.runs.preflight import TEMPLATE_TOKENS, TEMPLATE_TOKENS_PER_MESSAGE

from factories import WORKER_S, auth, copy_rows, jsonl, wait_until
from services import cli, serve_api, stack_settings, start_stack

EXACT = {
    "type": "string_check",
    "name": "exact",
    "input": "{{ sample.output_text }}",
    "reference": "{{ item.answer }}",
    "operation": "eq",
}
CLOSE = {
    "type": "text_similarity",
    "name": "close",
    "input": "{{ sample.output_text }}",
    "reference": "{{ item.answer }}",
    "evaluation_metric": "fuzzy_match",
}
MULTI = {
    "type": "multi",
    "name": "copy",
    "graders": {"exact": EXACT, "close": CLOSE},
    "calculate_output": "0.5 * exact + 0.5 * close",
}
# Small and fast on a CPU: 2 prompts a step, 2 completions each.
FAST = {"batch_size": 2, "n_epochs": 1, "compute_multiplier": 0.25, "eval_samples": 2}
ENDED = {"succeeded", "failed", "cancelled"}


def rft_rows(n: int = 8) -> list[dict]:
    """The copy task as OpenAI's reinforcement fine-tuning rows: messages, and the grader's
    field."""
    return [
        {"messages": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
        for r in copy_rows(n)
    ]


def reinforcement(grader: dict = EXACT, **hyperparameters) -> dict:
    return {
        "type": "reinforcement",
        "reinforcement": {"grader": grader, "hyperparameters": hyperparameters},
    }


def upload(client: OpenAI, rows: list[dict], purpose: str = "fine-tune") -> str:
    return client.files.create(file=("rft.jsonl", io.BytesIO(jsonl(rows))), purpose=purpose).id


def refusal(exc: pytest.ExceptionInfo) -> dict[str, str]:
    """An SDK error's body (our {"code", "message", "details"}), each bad field and its message."""
    body = exc.value.body
    return {f["field"]: f["message"] for f in body["details"].get("fields", [])} or {
        "": body["message"]
    }


# ---------------------------------------------------------------- the API alone


@pytest.fixture
def api_url(settings, tiny_model_dir):
    """The API served over HTTP in this process, the tiny model registered as "tiny"."""
    with session_scope(settings.resolved_database_url) as session:
        register_model(session, settings, "tiny", str(tiny_model_dir))
    with serve_api(settings) as live:
        yield f"http://127.0.0.1:{live.api_port}"


@pytest.fixture
def sdk(api_url, make_key):
    """make(project): an OpenAI client of the project, as a user makes one."""

    def make(project: str = "team-a") -> OpenAI:
        return OpenAI(base_url=f"{api_url}/v1", api_key=make_key(project))

    return make


def run_of(api_url: str, client: OpenAI, job) -> dict:
    """The job's run, through our own API."""
    headers = auth(client.api_key)
    return httpx.get(f"{api_url}/v1/runs/{job.run_id}", headers=headers).json()


def test_files_of_purpose_fine_tune_are_sdk_file_objects_of_chat_rows(sdk):
    client = sdk()
    rows = rft_rows(3)
    rows[0]["messages"].insert(0, {"role": "developer", "content": "Copy the letters."})
    rows[1]["reference"] = {"nested": [1, 2]}  # any field, for a grader's item.<field>
    created = client.files.create(file=("rft.jsonl", io.BytesIO(jsonl(rows))), purpose="fine-tune")
    assert isinstance(created, openai.types.FileObject)
    assert created.id.startswith("file_") and created.object == "file"
    assert (created.purpose, created.status, created.filename) == (
        "fine-tune",
        "processed",
        "rft.jsonl",
    )
    assert created.bytes == len(jsonl(rows)) and created.expires_at is None
    assert client.files.retrieve(created.id).id == created.id
    assert [f.id for f in client.files.list()] == [created.id]  # one page: has_more false

    for bad, needles in (
        ([{"prompt": "abc=", "answer": "abc"}], ("line 1", "'messages'")),
        (
            [rft_rows(1)[0], {"messages": [{"role": "user", "content": "a"}] * 2 + [ASSISTANT]}],
            ("line 2", "ends with an assistant message"),
        ),
    ):
        with pytest.raises(openai.BadRequestError) as exc:
            upload(client, bad)
        assert all(n in exc.value.body["message"] for n in needles), exc.value.body


ASSISTANT = {"role": "assistant", "content": "abc"}


def project_id(settings, name: str = "team-a") -> str:
    with session_scope(settings.resolved_database_url) as session:
        return session.scalar(select(Project.id).where(Project.name == name))


def test_a_job_is_a_gvpo_run_with_its_hyperparameters_mapped(
    sdk, api_url, settings, tiny_model_dir
):
    client = sdk()
    train, valid = upload(client, rft_rows(8)), upload(client, rft_rows(2))
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=train,
        validation_file=valid,
        method=reinforcement(
            n_epochs=3,
            batch_size=4,
            learning_rate_multiplier=2,
            compute_multiplier=0.5,
            eval_interval=2,
            eval_samples=3,
            reasoning_effort="low",
        ),
        seed=7,
        suffix="copy-task",
        metadata={"team": "search"},
    )
    assert isinstance(job, openai.types.fine_tuning.FineTuningJob)
    assert job.id.startswith("ftjob-") and job.object == "fine_tuning.job"
    assert (job.status, job.model, job.training_file, job.validation_file) == (
        "queued",
        "tiny",
        train,
        valid,
    )
    assert (job.seed, job.metadata, job.result_files, job.integrations) == (
        7,
        {"team": "search"},
        [],
        [],
    )
    assert job.fine_tuned_model is job.error is job.finished_at is job.trained_tokens is None
    assert job.method.type == "reinforcement"
    assert job.method.reinforcement.grader.type == "string_check"
    assert job.hyperparameters.n_epochs == 3 and job.hyperparameters.batch_size == 4
    assert job.organization_id == project_id(settings)

    spec = run_of(api_url, client, job)["spec"]
    context = json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"]
    room = context - (len("abc=") + TEMPLATE_TOKENS + TEMPLATE_TOKENS_PER_MESSAGE)
    assert spec["name"] == "copy-task" and spec["model"]["path"] == "tiny"
    assert spec["dataset"]["train_file"] == train and spec["dataset"]["eval_file"] == valid
    assert spec["reward"]["type"] == "string_check" and spec["reward"]["operation"] == "eq"
    assert (
        spec["training"].items()
        >= {
            "steps": 6,  # 3 epochs of 8 rows, 4 a step
            "prompts_per_step": 4,
            "mini_batches": 1,
            "seed": 7,
        }.items()
    )
    assert spec["optimizer"]["lr"] == pytest.approx(2e-6)
    assert spec["algorithm"]["group_size"] == 4
    assert spec["eval"].items() >= {"every_steps": 2, "samples_per_prompt": 3}.items()
    assert spec["checkpoint"]["every_steps"] == 2
    # low effort is 1024 new tokens, more than the tiny model's context leaves
    assert spec["sampling"]["max_new_tokens"] == min(1024, room)


def test_auto_hyperparameters_resolve_to_the_documented_values(sdk, api_url):
    client = sdk()
    train = upload(client, rft_rows(40))
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=train,
        method=reinforcement(n_epochs="auto", batch_size="auto", learning_rate_multiplier="auto"),
    )
    assert job.method.reinforcement.hyperparameters.model_dump() == {
        "batch_size": 16,  # at most 16 rows a step
        "n_epochs": 1,
        "learning_rate_multiplier": 1.0,
        "compute_multiplier": 1.0,
        "eval_interval": 1,  # about 10 evaluations: 3 steps
        "eval_samples": 4,
        "reasoning_effort": "default",
    }
    assert 0 <= job.seed <= 2**31 - 1
    spec = run_of(api_url, client, job)["spec"]
    assert (spec["training"]["steps"], spec["algorithm"]["group_size"]) == (3, 8)
    assert spec["optimizer"]["lr"] == pytest.approx(1e-6)
    assert spec["training"]["seed"] == job.seed


def test_jobs_list_newest_first_in_pages_and_by_metadata(sdk):
    client, other = sdk(), sdk("team-b")
    train = upload(client, rft_rows(4))
    made = [
        client.fine_tuning.jobs.create(
            model="tiny",
            training_file=train,
            method=reinforcement(**FAST),
            metadata={"batch": str(i % 2)} if i else None,
        )
        for i in range(3)
    ]
    newest = [j.id for j in reversed(made)]
    page = client.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in page.data] == newest[:2] and page.has_more
    assert [j.id for j in page.get_next_page().data] == newest[2:]
    assert [j.id for j in client.fine_tuning.jobs.list(limit=1)] == newest  # auto-paging
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"batch": "1"})] == [made[1].id]
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"batch": "0"})] == [made[2].id]
    assert client.fine_tuning.jobs.retrieve(made[0].id).id == made[0].id
    assert list(other.fine_tuning.jobs.list()) == []


def test_pause_resume_and_cancel_a_queued_job_and_its_events(sdk):
    client = sdk()
    job = client.fine_tuning.jobs.create(
        model="tiny", training_file=upload(client, rft_rows(4)), method=reinforcement(**FAST)
    )
    assert client.fine_tuning.jobs.pause(job.id).status == "paused"  # not in the SDK's Literal
    assert client.fine_tuning.jobs.retrieve(job.id).status == "paused"
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert cancelled.trained_tokens == 0 and cancelled.fine_tuned_model is None
    with pytest.raises(openai.ConflictError) as exc:
        client.fine_tuning.jobs.resume(job.id)
    assert "cancelled" in exc.value.body["message"]

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=2))  # pages of 2
    assert [e.data["gvpo_type"] for e in events] == [
        "run.cancelled",
        "run.resume_requested",
        "run.paused",
        "run.queued",
    ]
    assert all(isinstance(e, openai.types.fine_tuning.FineTuningJobEvent) for e in events)
    assert all(e.object == "fine_tuning.job.event" and e.type == "message" for e in events)
    assert all(e.level == "info" and e.id.startswith("ftevent-") for e in events)
    later = client.fine_tuning.jobs.list_events(job.id, after=events[1].id)
    assert [e.id for e in later.data] == [e.id for e in events[2:]] and not later.has_more


def test_a_running_job_shows_its_estimated_finish_and_is_pausing_once_asked(sdk, settings):
    client = sdk()
    job = client.fine_tuning.jobs.create(
        model="tiny", training_file=upload(client, rft_rows(4)), method=reinforcement(**FAST)
    )
    started = utcnow() - timedelta(seconds=60)
    with session_scope(settings.resolved_database_url) as session:  # as a worker would be
        run = session.get(Run, job.run_id)
        run.status, run.step, run.total_steps, run.started_at = "running", 1, 4, started
    running = client.fine_tuning.jobs.retrieve(job.id)
    assert running.status == "running" and running.trained_tokens is None
    expected = started.timestamp() + 4 * 60  # a step a minute, 4 steps
    assert abs(running.estimated_finish - expected) < 30
    assert client.fine_tuning.jobs.pause(job.id).status == "pausing"
    assert client.fine_tuning.jobs.retrieve(job.id).status == "pausing"


def ended(settings, run_id: str, status: str, steps: int, error: str | None = None) -> None:
    """Write the run as its worker would have left it: ended at `steps` steps, a checkpoint
    every 2 with the metrics of its step."""
    with session_scope(settings.resolved_database_url) as session:
        run = session.get(Run, run_id)
        run.status, run.step, run.total_steps, run.error = status, steps, steps, error
        run.started_at = utcnow() - timedelta(minutes=1)
        run.finished_at, run.tokens_generated = utcnow(), 123
        for step in range(2, steps + 1, 2):
            ckpt_id = f"ckpt_{run_id[4:]}_{step}"
            session.add(Checkpoint(id=ckpt_id, run_id=run_id, step=step, path="/x", bytes=1))
            for name, value in (("loss", -step / 10), ("reward/mean", step / 10)):
                session.add(Metric(run_id=run_id, name=name, step=step, value=value))
        session.add(Metric(run_id=run_id, name="eval/reward_mean", step=steps, value=0.75))


def test_an_ended_job_shows_its_model_checkpoints_metrics_and_error(sdk, settings):
    client = sdk()
    train = upload(client, rft_rows(4))
    done, broken = (
        client.fine_tuning.jobs.create(
            model="tiny", training_file=train, method=reinforcement(**FAST)
        )
        for _ in range(2)
    )
    ended(settings, done.run_id, "succeeded", 6)
    ended(settings, broken.run_id, "failed", 2, error="the grader's judge is unreachable")

    job = client.fine_tuning.jobs.retrieve(done.id)
    final = f"ckpt_{done.run_id[4:]}_6"
    assert (job.status, job.fine_tuned_model, job.trained_tokens) == ("succeeded", final, 123)
    assert job.error is None and job.finished_at >= job.created_at
    checkpoints = client.fine_tuning.jobs.checkpoints.list(done.id, limit=2)
    assert [c.step_number for c in checkpoints.data] == [6, 4] and checkpoints.has_more
    assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(done.id)] == [6, 4, 2]
    newest = checkpoints.data[0]
    assert isinstance(newest, openai.types.fine_tuning.jobs.FineTuningJobCheckpoint)
    assert (newest.id, newest.fine_tuned_model_checkpoint, newest.fine_tuning_job_id) == (
        final,
        final,
        done.id,
    )
    assert newest.metrics.step == 6 and newest.metrics.train_loss == pytest.approx(-0.6)
    assert newest.metrics.model_extra == {"train_reward_mean": 0.6, "valid_reward_mean": 0.75}
    assert checkpoints.data[1].metrics.model_extra == {
        "train_reward_mean": 0.4,
        "valid_reward_mean": None,
    }

    failed = client.fine_tuning.jobs.retrieve(broken.id)
    assert failed.status == "failed" and failed.fine_tuned_model is None
    assert failed.error.code == "run_failed"
    assert failed.error.message == "the grader's judge is unreachable"
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.cancel(broken.id)


def test_what_the_service_cannot_train_is_refused_naming_the_field(sdk, tiny_model_dir):
    client, other = sdk(), sdk("team-b")
    train, plain = upload(client, rft_rows(4)), upload(client, copy_rows(4), purpose="train")
    create = client.fine_tuning.jobs.create
    cases = [
        (dict(method={"type": "supervised", "supervised": {}}), "method.type", "reinforcement"),
        (
            dict(method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1}}}),
            "method.type",
            "GVPO",
        ),
        (dict(method=None, hyperparameters={"n_epochs": 2}), "hyperparameters", "supervised"),
        (dict(method=None), "method", "supervised"),
        (dict(hyperparameters={"n_epochs": 2}), "hyperparameters", "deprecated"),
        (dict(method={"type": "reinforcement"}), "method.reinforcement", "grader"),
        (dict(model="gpt-4o-mini"), "model", "gvpo models add"),
        (dict(model=str(tiny_model_dir / "nope")), "model", "no such directory"),
        (dict(training_file=plain), "training_file", "purpose 'train'"),
        (dict(validation_file=plain), "validation_file", "'fine-tune'"),
        (
            dict(method=reinforcement(compute_multiplier=0.1)),
            "method.reinforcement.hyperparameters.compute_multiplier",
            "at least 2",
        ),
        (
            dict(method=reinforcement(batch_size=0)),
            "method.reinforcement.hyperparameters.batch_size",
            "",
        ),
        (
            dict(method=reinforcement({**EXACT, "input": "{{ sample.text }"})),
            "method.reinforcement.grader.input",
            "does not parse",
        ),
        (
            dict(method=reinforcement({**EXACT, "input": "{{ answer }}"})),
            "method.reinforcement.grader.input",
            "item and sample",
        ),
        (
            dict(integrations=[{"type": "wandb", "wandb": {"project": "p"}}]),
            "integrations",
            "Weights & Biases",
        ),
        (dict(suffix="x" * 65), "suffix", ""),
        (dict(seed=-1), "seed", ""),
        (dict(metadata={f"k{i}": "v" for i in range(17)}), "metadata", ""),
    ]
    for changes, field, needle in cases:
        body = dict(model="tiny", training_file=train, method=reinforcement(**FAST)) | changes
        with pytest.raises(openai.UnprocessableEntityError) as exc:
            create(**body)
        fields = refusal(exc)
        assert field in fields and needle in fields[field], (changes, fields)

    with pytest.raises(openai.NotFoundError) as exc:  # another project's file
        other.fine_tuning.jobs.create(model="tiny", training_file=train, method=reinforcement())
    assert "training_file" in exc.value.body["message"]
    job = create(model="tiny", training_file=train, method=reinforcement(**FAST))
    for call in (
        other.fine_tuning.jobs.retrieve,
        other.fine_tuning.jobs.cancel,
        other.fine_tuning.jobs.pause,
        other.fine_tuning.jobs.resume,
        other.fine_tuning.jobs.list_events,
        other.fine_tuning.jobs.checkpoints.list,
    ):
        with pytest.raises(openai.NotFoundError):
            call(job.id)
    assert client.fine_tuning.jobs.list().data[0].id == job.id  # no refused job was recorded
    assert len(client.fine_tuning.jobs.list().data) == 1


# ---------------------------------------------------------------- the embedded stack

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir):
    """The embedded stack (API and worker processes), the tiny model registered as "tiny"."""
    settings = stack_settings(tmp_path_factory.mktemp("stack"))
    cli(settings, "db", "upgrade")
    cli(settings, "models", "add", "tiny", str(tiny_model_dir))
    running = start_stack(settings, settings.resolved_data_dir / "logs")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stack_client(stack) -> OpenAI:
    key = cli(stack.settings, "api-key", "create", "--project", "rft")
    return OpenAI(base_url=f"{stack.url}/v1", api_key=key)


def wait_for_job(client: OpenAI, job_id: str, statuses: set[str], timeout: float = 3 * WORKER_S):
    seen = {}

    def reached():
        seen["job"] = client.fine_tuning.jobs.retrieve(job_id)
        return seen["job"] if seen["job"].status in statuses else None

    try:
        return wait_until(reached, timeout, f"job {job_id} to be {statuses}", every=0.5)
    except AssertionError as exc:
        last = seen.get("job")
        raise AssertionError(f"{exc}: {last and (last.status, last.error)}") from None


@slow
@pytest.mark.parametrize("grader", [EXACT, MULTI], ids=["string_check", "multi"])
def test_a_reinforcement_job_trains_to_its_end_on_the_tiny_model(stack_client, grader):
    client = stack_client
    train = upload(client, rft_rows(4))
    valid = upload(client, rft_rows(2))
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=train,
        validation_file=valid,
        method=reinforcement(grader, **FAST, eval_interval=1, reasoning_effort="low"),
        suffix=f"copy-{grader['type']}",
    )
    done = wait_for_job(client, job.id, ENDED)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model.startswith("ckpt_") and done.trained_tokens > 0
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert checkpoints[0].fine_tuned_model_checkpoint == done.fine_tuned_model
    assert checkpoints[0].step_number == 2  # 4 rows, 2 a step
    assert checkpoints[0].metrics.model_extra["train_reward_mean"] is not None
    assert checkpoints[0].metrics.model_extra["valid_reward_mean"] is not None
    types = [e.data["gvpo_type"] for e in client.fine_tuning.jobs.list_events(job.id)]
    assert types[0] == "run.succeeded" and types[-1] == "run.queued"
    assert "eval.final" in types
    # the fine-tuned model is a model of the serving API, and a job may go on training it
    assert client.models.retrieve(done.fine_tuned_model).id == done.fine_tuned_model
    again = client.fine_tuning.jobs.create(
        model=done.fine_tuned_model, training_file=train, method=reinforcement(grader, **FAST)
    )
    assert again.model == done.fine_tuned_model
    client.fine_tuning.jobs.cancel(again.id)
    assert wait_for_job(client, again.id, ENDED).status in {"cancelled", "succeeded"}


@slow
def test_a_running_job_pauses_resumes_and_cancels(stack_client, stack):
    client = stack_client
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=upload(client, rft_rows(4)),
        method=reinforcement(EXACT, **{**FAST, "n_epochs": 200}, reasoning_effort="low"),
    )
    http = httpx.Client(base_url=stack.url, headers=auth(client.api_key), timeout=30)

    def stepped() -> bool:
        return http.get(f"/v1/runs/{job.run_id}").json()["step"] >= 1

    wait_until(stepped, 3 * WORKER_S, "the job's run to finish a step", every=0.5)
    assert client.fine_tuning.jobs.pause(job.id).status in {"pausing", "paused"}
    paused = wait_for_job(client, job.id, {"paused"})
    assert paused.fine_tuned_model is None
    assert list(client.fine_tuning.jobs.checkpoints.list(job.id))  # the pause checkpointed
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    wait_for_job(client, job.id, {"running"})
    client.fine_tuning.jobs.cancel(job.id)
    cancelled = wait_for_job(client, job.id, ENDED)
    assert cancelled.status == "cancelled"
    types = [e.data["gvpo_type"] for e in client.fine_tuning.jobs.list_events(job.id)]
    assert {"run.paused", "run.resume_requested", "run.cancel_requested"} <= set(types)
