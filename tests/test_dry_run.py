"""POST /v1/gvpo:dry_run: a group's log-ratios, GVPO weights and loss under a run's checkpoint,
computed by a real worker process and checked against the formula computed here by hand from
the models' own forward passes; and the answers when no worker can answer."""

from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.auth.service import create_api_key
from service.db import session_scope
from service.main import create_app
from service.models import Checkpoint, Run

from conftest import BACKENDS, CLUSTER, new_settings, release
from factories import WORKER_S, assert_error, auth, submit, wait_until
from services import closed_port, running_worker

pytestmark = [pytest.mark.both_backends, pytest.mark.slow]

PROMPT = "abc="
COMPLETIONS = ["abc", "xy", "abcd", "q z"]
REWARDS = [1.0, 0.0, 0.5, 0.25]
BETA = 0.2


def trained_run(settings, tiny_model_dir, **overrides) -> str:
    """A run the worker trained (checkpoints at steps 3 and 6), in the project "loop"."""
    # a reward most random completions earn and some miss, so that groups train
    run_id = submit(
        settings,
        tiny_model_dir,
        optimizer={"lr": 1e-2},
        reward={"type": "builtin", "name": "regex", "params": {"pattern": "[a-z]"}},
        checkpoint={"keep_last": None},
        **overrides,
    )
    ended = wait_until(
        lambda: run_status(settings, run_id) in ("succeeded", "failed"),
        2 * WORKER_S,
        f"the worker to finish run {run_id}",
    )
    assert ended and run_status(settings, run_id) == "succeeded"
    return run_id


@pytest.fixture(scope="module", params=BACKENDS)
def served(request, tmp_path_factory, tiny_model_dir) -> SimpleNamespace:
    """A worker process on a fresh database (once per back end), a full and a LoRA run it
    trained, an API over them and a key of the runs' project."""
    root = tmp_path_factory.mktemp("dry-run")
    settings = new_settings(root, request.param, request)
    with running_worker(settings, root / "worker.log"), TestClient(create_app(settings)) as api:
        full = trained_run(settings, tiny_model_dir)
        lora = trained_run(settings, tiny_model_dir, model={"lora": {"r": 4, "alpha": 8}})
        with session_scope(settings.resolved_database_url) as session:
            key = create_api_key(session, "loop", settings.api_key_pepper)[1]
        yield SimpleNamespace(api=api, settings=settings, key=key, full=full, lora=lora)
    release(settings)


def run_status(settings, run_id: str) -> str:
    with session_scope(settings.resolved_database_url) as session:
        return session.get(Run, run_id).status


def logprob(model, tokenizer, prompt: str, completion: str) -> float:
    """log pi(completion | prompt), one token at a time from a plain forward pass."""
    p = tokenizer(prompt)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([p + c])).logits[0].float()
    logps = torch.log_softmax(logits, dim=-1)
    return sum(logps[len(p) - 1 + t, tok].item() for t, tok in enumerate(c))


def by_hand(policy, reference, tokenizer) -> tuple[list[float], list[float], float]:
    s = [
        logprob(policy, tokenizer, PROMPT, c) - logprob(reference, tokenizer, PROMPT, c)
        for c in COMPLETIONS
    ]
    k = len(s)
    s_mean, r_mean = sum(s) / k, sum(REWARDS) / k
    w = [(r - r_mean) - BETA * (si - s_mean) for r, si in zip(REWARDS, s, strict=True)]
    loss = 0.5 * sum(wi**2 for wi in w) / (k - 1)
    return s, w, loss


def body(run_id: str, checkpoint_id: str | None = None, **changes) -> dict:
    return {
        "model": {"run_id": run_id, "checkpoint_id": checkpoint_id},
        "prompt": PROMPT,
        "completions": COMPLETIONS,
        "rewards": REWARDS,
        "beta": BETA,
        **changes,
    }


@pytest.mark.one_backend("sqlite")  # arithmetic on the worker
def test_weights_and_loss_match_the_formula(served, tiny_model_dir):
    api, key, run_id = served.api, served.key, served.full
    with session_scope(served.settings.resolved_database_url) as session:
        ckpts = session.execute(
            select(Checkpoint.id, Checkpoint.step, Checkpoint.path)
            .where(Checkpoint.run_id == run_id)
            .order_by(Checkpoint.step)
        ).all()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    for ckpt_id, step, path in ckpts:
        resp = api.post("/v1/gvpo:dry_run", headers=auth(key), json=body(run_id, ckpt_id))
        assert resp.status_code == 200, resp.text
        got = resp.json()
        assert (got["checkpoint_id"], got["step"], got["beta"]) == (ckpt_id, step, BETA)
        policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        s, w, loss = by_hand(policy, reference, tokenizer)
        rows = got["completions"]
        assert [r["completion"] for r in rows] == COMPLETIONS
        assert [r["reward"] for r in rows] == REWARDS
        assert [r["log_ratio"] for r in rows] == pytest.approx(s, abs=1e-4)
        assert [r["weight"] for r in rows] == pytest.approx(w, abs=1e-5)
        assert got["loss"] == pytest.approx(loss, rel=1e-4)
        assert all(r["log_ratio"] == pytest.approx(r["logprob"] - r["ref_logprob"]) for r in rows)
        assert sum(r["weight"] for r in rows) == pytest.approx(0.0, abs=1e-5)  # centred
        assert any(abs(x) > 1e-3 for x in s)  # the checkpoint moved away from the start
    # the latest checkpoint by default
    latest = api.post("/v1/gvpo:dry_run", headers=auth(key), json=body(run_id)).json()
    assert latest["checkpoint_id"] == ckpts[-1][0]


@pytest.mark.one_backend("sqlite")  # arithmetic on the worker
def test_a_lora_checkpoint_is_scored_against_its_base(served, tiny_model_dir):
    resp = served.api.post("/v1/gvpo:dry_run", headers=auth(served.key), json=body(served.lora))
    assert resp.status_code == 200, resp.text
    got = resp.json()
    from peft import PeftModel

    with session_scope(served.settings.resolved_database_url) as session:
        path = session.get(Checkpoint, got["checkpoint_id"]).path
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    policy = PeftModel.from_pretrained(base, path).merge_and_unload()
    s, w, loss = by_hand(policy, reference, tokenizer)
    assert [r["weight"] for r in got["completions"]] == pytest.approx(w, abs=1e-5)
    assert got["loss"] == pytest.approx(loss, rel=1e-4)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"rewards": [1.0, 0.0]}, "give one reward per completion"),
        ({"completions": ["only one"], "rewards": [1.0]}, "completions"),
        ({"beta": 0}, "beta"),
        ({"rewards": [1.0, "nan", 0.0, 0.0]}, "rewards"),
        ({"temperature": 1.0}, "temperature"),
    ],
    ids=["reward_count", "one_completion", "beta", "nan_reward", "unknown_field"],
)
def test_a_bad_group_is_422_naming_the_problem(
    api, settings, tiny_model_dir, make_key, changes, field
):
    run_id = submit(settings, tiny_model_dir)
    key = make_key("loop")
    assert_error(
        api.post("/v1/gvpo:dry_run", headers=auth(key), json=body(run_id, **changes)),
        422,
        "invalid_request",
        field,
    )


def test_runs_of_other_projects_and_runs_without_checkpoints(
    api, settings, tiny_model_dir, make_key
):
    run_id = submit(settings, tiny_model_dir)  # queued: no checkpoint yet
    key, stranger = make_key("loop"), make_key("team-b")
    assert_error(
        api.post("/v1/gvpo:dry_run", headers=auth(key), json=body(run_id)),
        409,
        "conflict",
        "has no checkpoint yet",
    )
    assert_error(
        api.post("/v1/gvpo:dry_run", headers=auth(stranger), json=body(run_id)), 404, "not_found"
    )
    assert_error(
        api.post("/v1/gvpo:dry_run", headers=auth(key), json=body(run_id, "ckpt_nope")),
        404,
        "not_found",
        "ckpt_nope",
    )
    assert api.post("/v1/gvpo:dry_run", json=body(run_id)).status_code == 401
    with session_scope(settings.resolved_database_url) as session:
        assert session.get(Run, run_id).status == "queued"  # a dry run changes nothing


@pytest.mark.one_backend("sqlite")  # arithmetic on the worker
def test_a_group_too_long_for_the_dry_run_is_422_from_the_worker(served):
    resp = served.api.post(
        "/v1/gvpo:dry_run",
        headers=auth(served.key),
        json=body(served.full, completions=["x" * 40_000, "y"], rewards=[1.0, 0.0]),
    )
    error = assert_error(resp, 422, "invalid_request", "at most 65536")
    assert [f["field"] for f in error["details"]["fields"]] == ["completions"]


def test_without_a_worker_the_dry_run_is_a_504_naming_the_queue(settings, tiny_model_dir, make_key):

    run_id = submit(settings, tiny_model_dir)
    with session_scope(settings.resolved_database_url) as session:
        session.add(
            Checkpoint(id="ckpt_x", run_id=run_id, step=1, path=str(tiny_model_dir), bytes=1)
        )
    impatient = settings.model_copy(update={"worker_answer_timeout_s": 1.0})
    with TestClient(create_app(impatient)) as api:
        resp = api.post("/v1/gvpo:dry_run", headers=auth(make_key("loop")), json=body(run_id))
    assert_error(
        resp,
        504,
        "worker_timeout",
        "no worker on queue 'default' answered the dry run",
        "within 1 s",
    )


def test_with_the_broker_down_the_dry_run_is_a_503(settings, tiny_model_dir):
    run_id = submit(settings, tiny_model_dir)
    with session_scope(settings.resolved_database_url) as session:
        session.add(
            Checkpoint(id="ckpt_x", run_id=run_id, step=1, path=str(tiny_model_dir), bytes=1)
        )
    with closed_port() as port:  # a Redis broker nobody answers
        down = settings.model_copy(
            update={
                "broker_url": f"redis://127.0.0.1:{port}/0",
                "reaper_interval_s": 0,
                **CLUSTER,
            }
        )
        with session_scope(settings.resolved_database_url) as session:  # a key, down's pepper
            key = create_api_key(session, "loop", down.api_key_pepper)[1]
        with TestClient(create_app(down)) as api:
            resp = api.post("/v1/gvpo:dry_run", headers=auth(key), json=body(run_id))
    assert_error(resp, 503, "unavailable", "the broker cannot be reached")
