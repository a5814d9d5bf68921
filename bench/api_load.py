"""Benchmark: requests/s and latency of the API under a closed-loop load, beside a bare FastAPI
endpoint served the same way (the framework's own ceiling on this machine).

`make bench` runs this in .venv-bench (locust is in the `bench` extra). By hand, from the
repository root:

    .venv-bench/bin/python bench/api_load.py [--users 16] [--seconds 15] [--warmup 1]

What is measured: locust (FastHttpUser, headless, run programmatically in a fresh subprocess per
scenario) with --users users and no wait time between requests, over loopback, for --warmup
seconds (not counted) and then --seconds seconds. Each scenario is a separate locust run; the
API scenarios all hit the same server process.

- ping:        `GET /ping` of a bare FastAPI app (one plain `def` route returning a small dict,
               run in the threadpool like the API's handlers), started by
               `uvicorn.run(app, host, port, log_level="info")`, the call `gvpo api` makes.
- runs:        `GET /v1/runs?limit=20` (API key auth) in a project of 50 runs.
- metrics:     `GET /v1/runs/{id}/metrics` of a run with 500 steps x 20 metric names (the names
               the worker records), written through `RunRecorder.record_step`.
- rewards:     `POST /v1/runs/{id}/rewards`: async reward callbacks signed with the run's webhook
               secret; each callback carries all 8 rewards of a request never called back before
               (a real write that completes the request). The requests were opened beforehand,
               enough that the load never runs out.
- rewards-dup: the same endpoint, repeating the identical callback of a request already complete
               (the retry path: accepted as a duplicate, 200 with accepted 0, nothing written).

The API is the product's own server command (`python -m service.cli api`, i.e. `gvpo api`:
uvicorn, one process, access log on, like the bare app) on the default embedded database,
SQLite (WAL) in a fresh temporary data dir; no worker runs (the run rows only have to exist).
Both servers' output goes to log files in that dir.

Reported per scenario: requests/s (responses received in the measured window / its seconds),
p50 and p99 latency in ms (exact, from every response, not locust's rounded histogram), the
failures locust counted (connection errors and 4xx/5xx responses), the non-2xx statuses seen (0:
no response), and requests/s as a share of ping's. After the run, the number of reward requests
the callbacks completed in the database is checked against the callbacks sent.

Caveat: the load generator and the server share this machine's cores (2 on the reference
machine): locust (one process, gevent) and uvicorn (one process: event loop + threadpool under
one GIL) each use about one core, so the numbers are a lower bound for either alone and the
locust CPU warning is reported when it fires.
"""

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCENARIOS = {  # name -> what the table shows
    "ping": "GET /ping (bare FastAPI)",
    "runs": "GET /v1/runs?limit=20",
    "metrics": "GET /v1/runs/{id}/metrics",
    "rewards": "POST /v1/runs/{id}/rewards (new)",
    "rewards-dup": "POST /v1/runs/{id}/rewards (duplicate)",
}
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
TARGET_ENV = "GVPO_BENCH_TARGET"  # what a load subprocess needs (API key, run ids, secret), JSON
DEFAULT_RATE = 3000  # req/s assumed when sizing the open requests without a ping figure


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
    from service.db import session_scope
    from service.migrate import prepare
    from workers.records import RunRecorder

    prepare(settings)
    with session_scope(settings.resolved_database_url) as session:
        _, key = create_api_key(session, "bench")
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

    from service.contract.states import RunStatus
    from service.db import session_scope
    from service.models import RewardRequest, Run
    from service.models.base import utcnow

    with session_scope(settings.resolved_database_url) as session:
        run = session.get(Run, run_id)
        run.status, run.lease_owner = RunStatus.RUNNING, "bench"
        run.lease_expires_at, run.started_at = utcnow() + timedelta(hours=1), utcnow()
        for n in range(count + DUPLICATES):
            request_id, step, sample_ids = reward_request(run_id, n)
            done = n >= count
            rewards = (
                {
                    r["sample_id"]: r["reward"]
                    for r in json.loads(callback_body(run_id, n))["rewards"]
                }
                if done
                else {}
            )
            session.add(
                RewardRequest(
                    id=request_id,
                    run_id=run_id,
                    step=step,
                    sample_ids=sample_ids,
                    rewards=rewards,
                    completed_at=utcnow() if done else None,
                )
            )
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


# --- the servers ---------------------------------------------------------------------------------


def serve_bare(port: int) -> None:
    """The ceiling: a FastAPI app with one route, served as `gvpo api` serves the real one."""
    import uvicorn
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/ping")
    def ping() -> dict:
        return {"ok": True}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="info")


def start_server(
    cmd: list[str], env: dict, url: str, ready_path: str, log: Path, timeout: float = 60.0
) -> subprocess.Popen:
    import httpx

    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{cmd} exited with code {proc.returncode} while starting; see {log}")
        try:
            if httpx.get(url + ready_path, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(proc)
    sys.exit(f"{url} was not ready after {timeout:.0f} s; see {log}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- the load (one fresh subprocess per scenario) ------------------------------------------------


def load(args) -> dict:
    """Run one scenario with locust in this process; returns the latencies and statuses seen."""
    import gevent
    from locust import FastHttpUser, constant, task
    from locust.env import Environment

    from gvpo_client.signing import HEADER, sign

    target, scenario = json.loads(os.environ.get(TARGET_ENV, "{}")), args.load
    counter = itertools.count()
    send = sender(scenario, target, counter, HEADER, sign)

    class Client(FastHttpUser):
        host, wait_time = args.host, constant(0)

        @task
        def one(self) -> None:
            send(self.client)

    seen = {"measuring": False, "times": [], "statuses": {}, "failures": 0}

    def on_request(response_time, response=None, exception=None, **_):
        if not seen["measuring"]:
            return
        seen["times"].append(response_time)
        status = getattr(response, "status_code", 0) or 0
        seen["statuses"][status] = seen["statuses"].get(status, 0) + 1
        seen["failures"] += exception is not None

    env = Environment(user_classes=[Client])
    env.events.request.add_listener(on_request)
    runner = env.create_local_runner()
    runner.start(args.users, spawn_rate=max(100, args.users))  # all up within the warm-up
    gevent.sleep(args.warmup)
    seen["measuring"], start = True, time.perf_counter()
    gevent.sleep(args.seconds)
    seen["measuring"], window = False, time.perf_counter() - start
    runner.quit()
    return {
        "times": seen["times"],
        "statuses": seen["statuses"],
        "failures": seen["failures"],
        "window_s": window,
        "sent": next(counter),
        "cpu_warning": runner.cpu_warning_emitted,
    }


def sender(scenario: str, target: dict, counter, header: str, sign):
    """What one locust task sends in `scenario`; `counter` numbers the requests sent."""
    if scenario in ("ping", "runs", "metrics"):
        path = {
            "ping": "/ping",
            "runs": "/v1/runs?limit=20",
            "metrics": f"/v1/runs/{target.get('metrics_run')}/metrics",
        }[scenario]
        headers = {"Authorization": f"Bearer {target['api_key']}"} if scenario != "ping" else {}

        def get(client) -> None:
            next(counter)
            client.get(path, headers=headers, name=SCENARIOS[scenario])

        return get
    run_id, secret = target["rewards_run"], target["secret"]
    path = f"/v1/runs/{run_id}/rewards"

    def callback(client) -> None:
        n = next(counter)
        # rewards: each request called back once, in order; rewards-dup: the completed ones
        n = n if scenario == "rewards" else target["open"] + n % DUPLICATES
        body = callback_body(run_id, n)
        client.post(
            path,
            data=body,
            name=SCENARIOS[scenario],
            headers={"Content-Type": "application/json", header: sign(secret, body)},
        )

    return callback


def run_load(args, scenario: str, url: str, target: dict) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--load",
        scenario,
        "--host",
        url,
        "--users",
        str(args.users),
        "--seconds",
        str(args.seconds),
        "--warmup",
        str(args.warmup),
    ]
    env = {**os.environ, TARGET_ENV: json.dumps(target)}  # the key and secret stay out of argv
    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, check=True, text=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    res["statuses"] = {int(k): v for k, v in res["statuses"].items()}
    return res


# --- the report ----------------------------------------------------------------------------------


def row(scenario: str, res: dict, ceiling: float | None) -> list[str]:
    n = len(res["times"])
    rate = n / res["window_s"]
    odd = ", ".join(f"{k}: {v}" for k, v in sorted(res["statuses"].items()) if not 200 <= k < 300)
    share = f"{rate / ceiling:.1%}" if ceiling else "-"
    return [
        scenario,
        SCENARIOS[scenario],
        f"{n}",
        f"{rate:.0f}",
        f"{statistics.median(res['times']):.1f}" if n else "-",
        f"{common.percentile(res['times'], 99):.1f}" if n else "-",
        f"{res['failures']}",
        odd or "none",
        share,
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=16, help="concurrent locust users")
    ap.add_argument("--seconds", type=float, default=15, help="measured seconds per scenario")
    ap.add_argument(
        "--warmup",
        type=float,
        default=1,
        help="seconds of load before each measurement starts (not counted)",
    )
    ap.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"any of {','.join(SCENARIOS)}"
    )
    ap.add_argument("--load", choices=list(SCENARIOS), help=argparse.SUPPRESS)
    ap.add_argument("--host", help=argparse.SUPPRESS)
    ap.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_bare:
        serve_bare(args.serve_bare)
        return
    if args.load:
        print(json.dumps(load(args)))
        return

    from service.config import Settings
    from service.stack import free_port, stack_env

    scenarios = args.scenarios.split(",")
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        sys.exit(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    started, results, notes = time.perf_counter(), {}, []
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if "ping" in scenarios:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = start_server(
                [sys.executable, __file__, "--serve-bare", str(port)],
                env,
                url,
                "/ping",
                Path(tmp) / "bare.log",
            )
            try:
                results["ping"] = run_load(args, "ping", url, {})
            finally:
                stop_server(proc)
        api = [s for s in scenarios if s != "ping"]
        if api:
            # enough open requests that the rewards scenario never runs out: the ceiling's rate
            rate = (
                len(results["ping"]["times"]) / results["ping"]["window_s"]
                if "ping" in results
                else DEFAULT_RATE
            )
            settings = Settings(data_dir=Path(tmp) / "gvpo", api_port=free_port())
            target = seed(settings, int(rate * (args.warmup + args.seconds) * 1.5) + 1000)
            url = settings.resolved_api_url
            proc = start_server(
                [sys.executable, "-m", "service.cli", "api"],
                {**stack_env(settings), "PYTHONUNBUFFERED": "1"},
                url,
                "/readyz",
                Path(tmp) / "api.log",
            )
            try:
                for scenario in api:
                    results[scenario] = run_load(args, scenario, url, target)
            finally:
                stop_server(proc)
            if "rewards" in results:
                sent, done = (
                    results["rewards"]["sent"],
                    completed_requests(settings, target["rewards_run"]),
                )
                notes.append(
                    f"rewards: {done - DUPLICATES} requests completed in the database "
                    f"for {sent} callbacks sent (of {target['open']} open; the last "
                    f"ones in flight when the load stopped may be missing either side)"
                )
    notes += [
        f"{s}: locust reported its CPU above 90% (the load generator is saturated)"
        for s, r in results.items()
        if r["cpu_warning"]
    ]
    ceiling = (
        len(results["ping"]["times"]) / results["ping"]["window_s"] if "ping" in results else None
    )
    head = [
        "scenario",
        "request",
        "requests",
        "req/s",
        "p50 ms",
        "p99 ms",
        "failures",
        "non-2xx",
        "req/s vs ping",
    ]
    common.print_table(
        f"{args.users} locust users, no wait, {args.seconds:g} s per scenario after "
        f"{args.warmup:g} s warm-up, loopback; uvicorn 1 process, SQLite; load generator and "
        f"server share {os.cpu_count()} cores; total {time.perf_counter() - started:.0f} s",
        head,
        [row(s, results[s], ceiling) for s in scenarios],
    )
    for note in notes:
        print(f"\nnote: {note}")


if __name__ == "__main__":
    main()
