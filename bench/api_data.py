"""bench/api_load.py's data: a project of runs made through the service layer (metrics written
by the worker's recorder), and the async reward callbacks the load sends: the same bytes for the
same request number, so that a repeat is an identical duplicate."""

import json

# What the worker records each step (workers/run_loop.py), plus two reward components.
METRIC_NAMES = [
    "reward/mean",
    "reward/std",
    "loss",
    "kl/ref",
    "logratio/mean",
    "logratio/std",
    "gvpo/residual_r2",
    "entropy",
    "grad_norm",
    "lr",
    "response_length/mean",
    "groups/zero_variance_frac",
    "rollout/logprob_diff_max",
    "time/weight_sync_s",
    "time/rollout_s",
    "time/reward_s",
    "time/learn_s",
    "throughput/tokens_per_s",
    "reward/correct/mean",
    "reward/format/mean",
]
STEPS, RUNS = 500, 50
GROUPS, GROUP_SIZE = 16, 8  # per step: one async reward request per group of 8 samples
DUPLICATES = 64  # completed requests the rewards-dup scenario repeats, round robin


# --- the callbacks both sides agree on -----------------------------------------------------------


def reward_request(run_id: str, n: int) -> tuple[str, int, list[str]]:
    """The n-th async request of the run: (request id, step, its sample ids), named as the
    worker names them (workers/rewards/webhook.py)."""
    run, step, group = run_id.removeprefix("run_"), n // GROUPS + 1, n % GROUPS
    return (
        f"rq_{run}_{step}_{n}_1",
        step,
        [f"smp_{run}_{step}_{group}_{i}" for i in range(GROUP_SIZE)],
    )


def callback_body(run_id: str, n: int) -> bytes:
    """The callback carrying all rewards of request n (always the same values for the same n)."""
    request_id, _, sample_ids = reward_request(run_id, n)
    rewards = [{"sample_id": s, "reward": ((n + i) % 11) / 10} for i, s in enumerate(sample_ids)]
    return json.dumps({"request_id": request_id, "rewards": rewards}).encode()


# --- the data ------------------------------------------------------------------------------------


def seed(settings, open_requests: int) -> dict:
    """A migrated data dir with a project of RUNS runs: one with STEPS x METRIC_NAMES metrics,
    one running with async reward requests open (and DUPLICATES more already complete).
    Returns what the load needs: the API key, the run ids and the reward run's secret."""
    from service.auth.service import create_api_key
    from service.db import get_engine, session_scope
    from service.migrate import prepare
    from workers.records import RunRecorder

    prepare(settings)
    with session_scope(settings.resolved_database_url) as session:
        _, key = create_api_key(session, "bench", settings.api_key_pepper)
    file_id = upload(settings)
    runs = [create(settings, file_id, f"bench-{i}", webhook=i == 1) for i in range(RUNS)]
    metrics_run, rewards_run = runs[0], runs[1]
    recorder = RunRecorder(settings, metrics_run, "bench")
    for step in range(1, STEPS + 1):
        recorder.record_step(
            step,
            {name: (step * 7 + i) % 101 / 100 for i, name in enumerate(METRIC_NAMES)},
            [],
            64 * 8,
        )
    secret = open_requests_for(settings, rewards_run, open_requests)
    get_engine(settings.resolved_database_url).dispose()  # no idle connection left behind
    return {
        "api_key": key,
        "metrics_run": metrics_run,
        "rewards_run": rewards_run,
        "secret": secret,
        "open": open_requests,
    }


def upload(settings) -> str:
    import io

    from sqlalchemy import select

    from service.db import session_scope
    from service.files.service import create_file
    from service.models import Project

    rows = "".join(
        json.dumps({"prompt": f"{w:03d}=", "answer": f"{w:03d}"}) + "\n" for w in range(64)
    ).encode()
    with session_scope(settings.resolved_database_url) as session:
        project = session.scalar(select(Project).where(Project.name == "bench"))
        return create_file(session, settings, project, io.BytesIO(rows), "copy.jsonl", "train").id


def create(settings, file_id: str, name: str, webhook: bool) -> str:
    """A queued run as tests/helpers.py `submit()` makes one (the model path is never loaded)."""
    from sqlalchemy import select

    from service.contract.spec import RunSpec
    from service.db import session_scope
    from service.models import Project
    from service.runs.service import create_run

    reward = (
        {"type": "webhook", "url": "http://127.0.0.1:9/reward", "mode": "async"}
        if webhook
        else {"type": "builtin", "name": "char_accuracy"}
    )
    spec = {
        "name": name,
        "model": {"path": "bench/never-loaded"},  # a hub id: the API reads no model
        "reward": reward,
        "dataset": {"train_file": file_id},
        "algorithm": {"group_size": GROUP_SIZE},
        "training": {"steps": STEPS, "prompts_per_step": GROUPS},
    }
    # the model is never loaded, so the API's submission-time model checks are off
    live = settings.model_copy(update={"webhook_allow_private": True, "model_path_check": "off"})
    with session_scope(settings.resolved_database_url) as session:
        project = session.scalar(select(Project).where(Project.name == "bench"))
        return create_run(session, live, project, RunSpec.model_validate(spec), None)[0].id


def open_requests_for(settings, run_id: str, count: int) -> str:
    """Mark the run running (leased for an hour, so the reaper leaves it alone), open `count`
    requests as `RunRecorder.open_reward_request` does (in one transaction), and DUPLICATES more
    already complete; returns the run's webhook secret."""
    from datetime import timedelta

    from sqlalchemy import insert

    from service.contract.states import RunStatus
    from service.db import session_scope
    from service.models import RewardRequest, Run
    from service.models.base import utcnow

    now, rows = utcnow(), []
    for n in range(count + DUPLICATES):
        request_id, step, sample_ids = reward_request(run_id, n)
        done = n >= count
        body = json.loads(callback_body(run_id, n))
        rows.append(
            {
                "id": request_id,
                "run_id": run_id,
                "step": step,
                "sample_ids": sample_ids,
                "rewards": {r["sample_id"]: r["reward"] for r in body["rewards"]} if done else {},
                "created_at": now,
                "completed_at": now if done else None,
            }
        )
    with session_scope(settings.resolved_database_url) as session:
        run = session.get(Run, run_id)
        run.status, run.lease_owner = RunStatus.RUNNING, "bench"
        run.lease_expires_at, run.started_at = now + timedelta(hours=1), now
        session.execute(insert(RewardRequest), rows)  # one executemany, not an ORM flush
        return settings.sealer.open(run.webhook_secret_encrypted)


def completed_requests(settings, run_id: str) -> int:
    from sqlalchemy import func, select

    from service.db import session_scope
    from service.models import RewardRequest

    with session_scope(settings.resolved_database_url) as session:
        return session.scalar(
            select(func.count())
            .select_from(RewardRequest)
            .where(RewardRequest.run_id == run_id, RewardRequest.completed_at.is_not(None))
        )
