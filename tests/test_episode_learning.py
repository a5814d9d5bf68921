"""The multi-turn toy task learnt through the real worker (issue 20's acceptance): secret_code,
whose reward needs what the environment says after the first turn, played against a webhook
environment over loopback HTTP (examples/environment_server.py, a process of its own) and
against the built-in environment. The tiny model starts near 0 and ends above 0.7.

The two environments answer alike, so the same seed gives the same run: the built-in one plays
only the first BUILTIN_STEPS steps (the learning curve's flat start, which is where a difference
would show first) and must match the webhook run's reward step for step.

One embedded stack (API and worker processes, SQLite, the file broker); both runs are queued at
once and the worker trains them one after the other.
"""

from types import SimpleNamespace

import httpx
import pytest

from workers.environments.builtin import secret_code_rows

from factories import auth, upload, wait_for_run
from services import cli, reference_server, stack_settings, start_stack

pytestmark = pytest.mark.slow

SECRET = "whsec_episodes_acceptance_0123456789"
STEPS = 500
BUILTIN_STEPS = 40
# The toy task's settings: short turns, large groups, a larger beta than GVPO's default (at
# 0.01 the reward was still 0.2 after 500 steps; 0.05 keeps each group diverse for longer).
SECRET_CODE = {
    "algorithm": {"group_size": 16, "beta": 0.05},
    # transformers: on a CPU a tiny model's steps cost less without vLLM's per-step overhead
    # (tests/test_vllm_episodes.py plays episodes with vLLM)
    "rollout": {"engine": "hf"},
    "sampling": {"max_new_tokens": 4},
    "optimizer": {"lr": 1e-3},
    "training": {"steps": STEPS, "prompts_per_step": 8, "mini_batches": 1},
    "checkpoint": {"every_steps": 100, "keep_last": 1},
    "reward": {"type": "builtin", "name": "exact_match"},  # unused: the environment scores
}
LEARN_S = 1800.0  # both runs, on a loaded 2-core machine


@pytest.fixture(scope="module")
def environment_url():
    env = {"ENVIRONMENT_WEBHOOK_SECRET": SECRET}
    with reference_server("examples.environment_server:app", "/step", env) as url:
        yield url


@pytest.fixture(scope="module")
def learnt(tmp_path_factory, tiny_model_dir, environment_url) -> SimpleNamespace:
    settings = stack_settings(tmp_path_factory.mktemp("stack"), webhook_allow_private=True)
    cli(settings, "db", "upgrade")
    stack = start_stack(settings, settings.resolved_data_dir / "logs")
    try:
        key = cli(settings, "api-key", "create", "--project", "episodes")
        http = httpx.Client(base_url=stack.url, headers=auth(key), timeout=60)
        train = upload(http, None, secret_code_rows(64), filename="secret_code.jsonl")
        environments = {
            "webhook": {"type": "webhook", "url": environment_url, "max_turns": 2},
            "builtin": {"type": "builtin", "name": "secret_code", "max_turns": 2},
        }
        runs = {}
        for name, environment in environments.items():
            body = {
                "name": f"secret-code-{name}",
                "model": {"path": str(tiny_model_dir)},
                "dataset": {"train_file": train},
                "environment": environment,
                "webhook_secret": SECRET,
                **SECRET_CODE,
            }
            if name == "builtin":
                body["training"] = {**body["training"], "steps": BUILTIN_STEPS}
            created = http.post("/v1/runs", json=body)
            assert created.status_code == 201, created.text
            runs[name] = created.json()["id"]
        ended = {
            name: wait_for_run(http, run_id, {"succeeded", "failed", "cancelled"}, LEARN_S)
            for name, run_id in runs.items()
        }
        curves = {
            name: [
                v
                for _, v in http.get(f"/v1/runs/{run['id']}/metrics").json()["metrics"][
                    "reward/mean"
                ]
            ]
            for name, run in ended.items()
        }
        yield SimpleNamespace(http=http, runs=ended, curves=curves)
    finally:
        stack.stop()


def windows(curve: list[float], size: int = 50) -> list[float]:
    return [
        round(sum(curve[i : i + size]) / len(curve[i : i + size]), 3)
        for i in range(0, len(curve), size)
    ]


def test_the_toy_task_is_learnt_from_the_environments_answers(learnt):
    run, curve = learnt.runs["webhook"], learnt.curves["webhook"]
    assert run["status"] == "succeeded", run["error"]
    print("webhook reward/mean per 50 steps:", windows(curve))
    assert len(curve) == STEPS
    assert sum(curve[:20]) / 20 <= 0.2
    assert sum(curve[-50:]) / 50 >= 0.7


def test_the_builtin_environment_plays_the_same_run(learnt):
    run, curve = learnt.runs["builtin"], learnt.curves["builtin"]
    assert run["status"] == "succeeded", run["error"]
    assert len(curve) == BUILTIN_STEPS
    assert curve == learnt.curves["webhook"][:BUILTIN_STEPS]


def test_episode_samples_show_the_environments_turn(learnt):
    run = learnt.runs["webhook"]
    samples = learnt.http.get(f"/v1/runs/{run['id']}/samples", params={"step": STEPS}).json()[
        "data"
    ]
    assert len(samples) == 8 * 16
    for s in samples:
        turns = s["episode"]["turns"]
        assert [(t["role"], t["trained"]) for t in turns] == [
            ("assistant", True),
            ("user", False),
            ("assistant", True),
        ]
        assert turns[1]["content"] == s["answer"] and s["completion"] == turns[2]["content"]
