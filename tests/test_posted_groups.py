"""Groups posted to a run while it goes (POST /v1/runs/{id}/groups): they fill the run's
off-policy slots, oldest first, before its offpolicy file, and train with the GVPO loss."""

import pytest
from sqlalchemy import select

from service.db import session_scope
from service.models import Metric, Run, RunGroup, Sample
from workers.execute import execute_run
from workers.records import RunRecorder

from factories import assert_error, auth, submit

K = 4  # submit()'s group size


def group(prompt: str = "abc=", answer: str = "abc", **extra) -> dict:
    return {
        "prompt": prompt,
        "answer": answer,
        "completions": ["abc", "ab", "xyz", "a"],
        "source": "teacher",
        **extra,
    }


def offpolicy_submit(settings, model_dir, fraction: float = 0.5, **overrides) -> str:
    return submit(
        settings,
        model_dir,
        training={
            "steps": 3,
            "prompts_per_step": 2,
            "mini_batches": 1,
            "offpolicy_fraction": fraction,
        },
        **overrides,
    )


def post(api, key: str, run_id: str, groups: list[dict]):
    return api.post(f"/v1/runs/{run_id}/groups", headers=auth(key), json={"groups": groups})


@pytest.mark.both_backends
def test_posting_rules(api, settings, make_key, tiny_model_dir):
    key = make_key("loop")  # submit() creates its runs in project "loop"
    run_id = offpolicy_submit(settings, tiny_model_dir)
    resp = post(api, key, run_id, [group(), group(rewards=[1, 0.5, 0, 0.2])])
    assert resp.status_code == 202, resp.text
    assert resp.json() == {
        "object": "run.groups",
        "run_id": run_id,
        "accepted": 2,
        "pending": 2,
        "trained": 0,
        "slots_per_step": 1,
    }
    error = assert_error(
        post(
            api,
            key,
            run_id,
            [
                group(),
                group(completions=list("abcde")),
                group(rewards=[1, 2]),
                group(completions=["a"], rewards=[1]),
            ],
        ),
        422,
        "invalid_request",
        "groups.1",
        "group_size is 4",
    )
    assert [f["field"] for f in error["details"]["fields"]] == ["groups.1", "groups.2", "groups.3"]
    assert "leave its rewards out" in error["details"]["fields"][2]["message"]
    assert post(api, key, run_id, [group(completions=["abc"])]).status_code == 202  # topped up
    long = group(completions=["abc", "ab", "x" * 300, "a"])  # the tiny model's context is 256
    assert_error(
        post(api, key, run_id, [group(), long]),
        422,
        "invalid_request",
        "groups.1",
        "more than the model's context of 256 tokens",
    )
    assert_error(
        api.post(f"/v1/runs/{run_id}/groups", headers=auth(key), json={"groups": []}),
        422,
        "invalid_request",
        "groups",
    )
    assert_error(post(api, make_key("other"), run_id, [group()]), 404, "not_found")
    no_slots = submit(settings, tiny_model_dir)
    assert_error(post(api, key, no_slots, [group()]), 409, "conflict", "no off-policy slots")
    with session_scope(settings.resolved_database_url) as session:  # stored by older rules
        session.get(Run, no_slots).spec = {
            **session.get(Run, no_slots).spec,
            "algorithm": {"group_size": 1},
        }
    assert_error(post(api, key, no_slots, [group()]), 409, "conflict", "no longer passes")
    api.post(f"/v1/runs/{run_id}/cancel", headers=auth(key))
    assert_error(post(api, key, run_id, [group()]), 409, "conflict", "cancelled")
    status = api.get(f"/v1/runs/{run_id}/groups", headers=auth(key)).json()
    assert (status["pending"], status["accepted"]) == (3, 0)  # nothing of the refused kept


@pytest.mark.both_backends
def test_posted_groups_train_in_the_off_policy_slots(settings, tiny_model_dir):
    """One off-policy slot per step, no file: the two posted groups train at steps 1 and 2, as
    given (supplied rewards kept, the others scored by the run's reward); step 3 has none left
    and samples both of its groups."""
    from service.models import Project
    from service.offpolicy.service import post_groups
    from workers.rewards.builtin import char_accuracy

    run_id = offpolicy_submit(settings, tiny_model_dir)
    posted = [group(rewards=[0.9, 0.1, 0.4, 0.2]), group("dcb=", "dcb", source="logs")]
    with session_scope(settings.resolved_database_url) as session:
        project = session.get(Project, session.get(Run, run_id).project_id)
        post_groups(session, settings, project, run_id, posted)
    assert execute_run(settings, run_id, "worker-a") == "succeeded"
    with session_scope(settings.resolved_database_url) as session:
        rows = session.execute(
            select(Sample.step, Sample.group_index, Sample.completion, Sample.reward, Sample.source)
            .where(Sample.run_id == run_id)
            .order_by(Sample.step, Sample.group_index, Sample.sample_index)
        ).all()
        taken = session.scalars(
            select(Metric.value)
            .where(Metric.run_id == run_id, Metric.name == "offpolicy/posted_groups")
            .order_by(Metric.step)
        ).all()
        steps = session.scalars(
            select(RunGroup.taken_step).where(RunGroup.run_id == run_id).order_by(RunGroup.id)
        ).all()
    first = {(step, g): [] for step, g, *_ in rows}
    for step, g, completion, reward, source in rows:
        first[step, g].append((completion, reward, source))
    assert first[1, 0] == list(
        zip(
            posted[0]["completions"],
            map(pytest.approx, posted[0]["rewards"]),
            ["teacher"] * K,
            strict=True,
        )
    )
    assert first[2, 0] == [
        (c, pytest.approx(char_accuracy(c, "dcb", None)), "logs") for c in posted[1]["completions"]
    ]
    assert {s for _, _, s in first[1, 1] + first[3, 0] + first[3, 1]} == {"policy"}
    assert taken == [1.0, 1.0, 0.0]
    assert steps == [1, 2]


def test_a_replayed_step_takes_the_same_groups(settings, tiny_model_dir):
    """take_groups: oldest first, in multiples of the rollout engines; a step replayed after a
    resume takes again what it took (and leaves what later steps took to them)."""
    run_id = offpolicy_submit(settings, tiny_model_dir)
    with session_scope(settings.resolved_database_url) as session:
        session.add_all(RunGroup(run_id=run_id, body=group(prompt=f"g{i}=")) for i in range(5))
    recorder = RunRecorder(settings, run_id, "worker-a")

    def take(step: int, most: int, engines: int = 1) -> list[str]:
        return [g["prompt"] for g in recorder.take_groups(step, most, engines)]

    assert take(1, 2) == ["g0=", "g1="]
    assert take(2, 2) == ["g2=", "g3="]
    assert take(2, 2) == ["g2=", "g3="]  # step 2 again, after a resume from step 1
    assert take(1, 2) == ["g0=", "g1="]
    assert take(3, 4, engines=2) == []  # one left: not enough for two engines
    assert take(3, 4, engines=1) == ["g4="]
