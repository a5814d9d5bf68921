"""Benchmark: requests/s and latency of the API under a closed-loop load, beside a bare FastAPI
endpoint served the same way (the framework's own ceiling on this machine), on SQLite and on
PostgreSQL.

`make bench` runs this in .venv-bench (locust is in the `bench` extra). By hand, from the
repository root:

    .venv-bench/bin/python bench/api_load.py [--databases sqlite,postgresql] [--users 16]
        [--seconds 15] [--warmup 2] [--rounds 3] [--load-procs 1] [--profile DIR]

What is measured: locust (FastHttpUser, headless, run programmatically in fresh subprocesses
per scenario: --load-procs processes sharing --users users) with no wait time between requests,
over loopback, for --warmup seconds (not counted) and then --seconds seconds. Each scenario is
a separate locust run; a database's API scenarios all hit the same server process. Every
scenario runs --rounds times, each round measuring ping again just before the API's scenarios:
this machine's speed drifts by a third within minutes, so a share is only meaningful against a
ping measured beside it.

- ping:        `GET /ping` of a bare FastAPI app (one plain `def` route returning a small dict,
               run in the threadpool like the API's handlers).
- runs:        `GET /v1/runs?limit=20` (API key auth) in a project of 50 runs.
- metrics:     `GET /v1/runs/{id}/metrics` of a run with 500 steps x 20 metric names (the names
               the worker records), written through `RunRecorder.record_step`.
- rewards:     `POST /v1/runs/{id}/rewards`: async reward callbacks signed with the run's webhook
               secret; each callback carries all 8 rewards of a request never called back before
               (a real write that completes the request). The requests were opened beforehand,
               enough that the load never runs out. Each load process builds and signs every
               callback it may send before its load starts (not timed), so that it does no
               more per request than ping's.
- rewards-dup: the same endpoint, repeating the identical callback of a request already complete
               (the retry path: accepted as a duplicate, 200 with accepted 0, nothing written).

Both servers run through `service.edge.serve`, the call `gvpo api` makes: one uvicorn process,
uvicorn's default event loop (uvloop when installed), the API's HTTP protocol (httptools with a
head limit), the access log on, handlers in AnyIO's threadpool (40 threads). The API is the
product's own server command (`python -m service.cli api`) on a fresh data dir; no worker runs
(the run rows only have to exist). sqlite: the embedded database (WAL). postgresql: a
throwaway PostgreSQL cluster on loopback (tests/services.py `Postgres`) with its default
settings (fsync on: a commit waits for the disk, as in production) and cluster secrets set, as
a cluster runs; the API's own pools (service/db.py: 20 + 20 connections, threaded and on the
event loop). Servers' output goes
to log files in a temporary dir.

Reported per scenario: requests/s (responses received in the measured window / its seconds),
p50 and p99 latency in ms (exact, from every response, not locust's rounded histogram), the
failures locust counted (connection errors and 4xx/5xx responses), the non-2xx statuses seen (0:
no response), requests/s as a share of ping's (measured just before, in the same database's
round), the server process's CPU time per response (what a request costs the server, whatever
else runs on the machine), and the CPU used in the window, in % of one core, by the server
process, PostgreSQL's processes and the load generator. After the run, the number of reward
requests the callbacks completed in the database is checked against the callbacks sent.

Caveat: the load generator, the server and PostgreSQL share this machine's cores (2 on the
reference machine): the numbers are a lower bound for the server alone; the CPU columns say who
used the cores. --profile DIR records the API process with py-spy during each API scenario
(collapsed stacks, one file per database and scenario; py-spy must be installed).
"""

import argparse
import itertools
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import api_data as data
import common
import procs

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

SCENARIOS = {  # name -> what the table shows
    "ping": "GET /ping (bare FastAPI)",
    "runs": "GET /v1/runs?limit=20",
    "metrics": "GET /v1/runs/{id}/metrics",
    "rewards": "POST /v1/runs/{id}/rewards (new)",
    "rewards-dup": "POST /v1/runs/{id}/rewards (duplicate)",
}
DATABASES = ("sqlite", "postgresql")
TARGET_ENV = "GVPO_BENCH_TARGET"  # what a load subprocess needs (API key, run ids, secret), JSON
DEFAULT_RATE = 3000  # req/s assumed when sizing the open requests without a ping figure


# --- the servers ---------------------------------------------------------------------------------


def serve_bare(port: int) -> None:
    """The ceiling: a FastAPI app with one route, served as `gvpo api` serves the real one."""
    from fastapi import FastAPI

    from service.edge import serve

    app = FastAPI()

    @app.get("/ping")
    def ping() -> dict:
        return {"ok": True}

    serve(app, "127.0.0.1", port)


def server_settings() -> str:
    """How both servers run, as the table's caption says it."""
    import uvicorn

    from service.edge import SERVER

    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    return (
        f"uvicorn {uvicorn.__version__}, 1 process, loop {loop}, "
        f"http {SERVER['http'].__name__} (httptools), access log on, 40 threadpool threads"
    )


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


class Database:
    """The database of one block: SQLite in the data dir, or a throwaway PostgreSQL cluster
    (started on enter, removed on exit); `settings` are the API's for it."""

    def __init__(self, kind: str, tmp: Path) -> None:
        from service.config import Settings
        from service.stack import free_port

        self.kind, self.pg, self.pg_root = kind, None, None
        extra = {}
        if kind == "postgresql":
            from services import Postgres

            # under /tmp itself: as root the cluster runs as the postgres user, who must reach it
            self.pg_root = Path(tempfile.mkdtemp(prefix="bench-api-pg-"))
            self.pg = Postgres(self.pg_root, options="")  # PostgreSQL's defaults: fsync on
            self.pg.start()
            # a cluster must set its secrets (Settings.unsafe_secrets)
            extra = {
                name: secrets.token_hex(32)
                for name in ("secret_key", "api_key_pepper", "encryption_key")
            }
            extra["database_url"] = self.pg.url
        self.settings = Settings(
            data_dir=tmp / kind, api_port=free_port(), grpc_port=free_port(), **extra
        )

    def pids(self) -> list[int]:
        """PostgreSQL's postmaster (its backends are its children); none for SQLite."""
        if self.pg is None:
            return []
        return [int((self.pg.data / "postmaster.pid").read_text().split()[0])]

    def close(self) -> None:
        if self.pg is not None:
            self.pg.stop("immediate")
            shutil.rmtree(self.pg_root, ignore_errors=True)


# --- the load (fresh subprocesses per scenario) --------------------------------------------------


def tree_cpu(roots: list[int]) -> dict[int, float]:
    return procs.cpu_seconds([p for root in roots for p in procs.process_tree(root)])


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds used between two readings (processes started in between count whole)."""
    return sum(used - before.get(pid, 0.0) for pid, used in after.items())


def load(args) -> dict:
    """Run one scenario's share (part `args.part` of `args.load_procs`) with locust in this process;
    returns the latencies and statuses seen, and the CPU the watched processes used."""
    import gevent
    from locust import FastHttpUser, constant, task
    from locust.env import Environment

    from gvpo_client.signing import HEADER, sign

    target, scenario = json.loads(os.environ.get(TARGET_ENV, "{}")), args.load
    counter = itertools.count(args.part, args.load_procs)  # the parts number requests apart
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
    watched = {side: tree_cpu(pids) for side, pids in target.get("watch", {}).items()}
    seen["measuring"], start, cpu = True, time.perf_counter(), time.process_time()
    gevent.sleep(args.seconds)
    seen["measuring"], window = False, time.perf_counter() - start
    cpu = {"load": time.process_time() - cpu}
    for side, before in watched.items():
        cpu[side] = cpu_used(before, tree_cpu(target["watch"][side]))
    runner.quit()
    return {
        "times": seen["times"],
        "statuses": seen["statuses"],
        "failures": seen["failures"],
        "window_s": window,
        "sent": (next(counter) - args.part) // args.load_procs,
        "cpu_s": cpu,
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
    # Every callback this process may send, built and signed before the load starts (the
    # signatures are good for 5 minutes): the load generator shares the cores with the server,
    # and building and signing each one during the load cost it twice ping's CPU per request.
    if scenario == "rewards":  # each request called back once, in order, after earlier rounds'
        base = target.get("first", 0)
        count = target["open"] - base
    else:  # rewards-dup: the completed ones, round robin
        base, count = target["open"], data.DUPLICATES

    def signed(k: int) -> tuple[bytes, dict]:
        body = data.callback_body(run_id, base + k)
        return body, {"Content-Type": "application/json", header: sign(secret, body)}

    prepared = [signed(k) for k in range(count)]

    def callback(client) -> None:
        k = next(counter)
        k = k if scenario == "rewards" else k % count
        # past the open requests (never so far): an unknown request, the 400 the table counts
        body, headers = prepared[k] if k < count else signed(k)
        client.post(path, data=body, name=SCENARIOS[scenario], headers=headers)

    return callback


def run_load(args, scenario: str, url: str, target: dict, profile: Path | None = None) -> dict:
    """The scenario's load from --load-procs subprocesses at once (each with its share of the
    users); with `profile`, py-spy records the server meanwhile into that file."""
    parts = args.load_procs
    env = {**os.environ, TARGET_ENV: json.dumps(target)}  # the key and secret stay out of argv
    spy = None
    if profile is not None:
        # --gil: samples of the thread holding the GIL, i.e. where the server's Python CPU goes
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        spy = subprocess.Popen(
            [py_spy, "record", "--pid", str(target["watch"]["api"][0]), "--format", "raw"]
            + ["--gil", "--duration", str(int(args.warmup + args.seconds))]
            + ["--output", str(profile)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    loads = []
    for part in range(parts):
        users = args.users // parts + (part < args.users % parts)
        cmd = [sys.executable, __file__, "--load", scenario, "--host", url, "--users", str(users)]
        cmd += ["--seconds", str(args.seconds), "--warmup", str(args.warmup)]
        cmd += ["--part", str(part), "--load-procs", str(parts)]
        loads.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in loads]
    if any(p.returncode for p in loads):
        sys.exit(f"a load process of {scenario} failed")
    if spy is not None:
        spy.wait()
    res = {
        "times": [t for o in outs for t in o["times"]],
        "statuses": {},
        "failures": sum(o["failures"] for o in outs),
        "window_s": max(o["window_s"] for o in outs),
        "sent": sum(o["sent"] for o in outs),
        "cpu_warning": any(o["cpu_warning"] for o in outs),
        # every load process's own; the servers' from the first (all watched the same window)
        "cpu_s": {**outs[0]["cpu_s"], "load": sum(o["cpu_s"]["load"] for o in outs)},
    }
    for o in outs:
        for status, n in o["statuses"].items():
            res["statuses"][int(status)] = res["statuses"].get(int(status), 0) + n
    return res


# --- one database's block ------------------------------------------------------------------------


def run_block(args, kind: str, scenarios: list[str], tmp: Path) -> tuple[list[dict], list[str]]:
    """The scenarios on one database, --rounds times: in each round ping against the bare app,
    then the API's scenarios, so that each share compares requests/s measured minutes apart at
    most (this machine's speed drifts more than that). Both servers stay up for the block; the
    rewards scenario goes on where the last round stopped. One dict of results per round."""
    from service.stack import free_port, stack_env

    rounds, notes = [{} for _ in range(args.rounds)], []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    bare = None
    api = [s for s in scenarios if s != "ping"]
    db = Database(kind, tmp)
    try:
        if "ping" in scenarios:
            port = free_port()
            bare_url = f"http://127.0.0.1:{port}"
            cmd = [sys.executable, __file__, "--serve-bare", str(port)]
            bare = start_server(cmd, env, bare_url, "/ping", tmp / f"bare-{kind}.log")
            bare_target = {"watch": {"api": [bare.pid]}}
            rounds[0]["ping"] = run_load(args, "ping", bare_url, bare_target)
        if not api:
            return rounds, notes
        # enough open requests that the rewards scenario never runs out: the ceiling's rate
        rate = rate_of(rounds[0]["ping"]) if "ping" in rounds[0] else DEFAULT_RATE
        settings = db.settings
        per_round = int(rate * (args.warmup + args.seconds) * 1.5) + 1000
        target = data.seed(settings, per_round * args.rounds)
        url = settings.resolved_api_url
        proc = start_server(
            [sys.executable, "-m", "service.cli", "api"],
            {**stack_env(settings), "PYTHONUNBUFFERED": "1"},
            url,
            "/readyz",
            tmp / f"api-{kind}.log",
        )
        target["watch"], target["first"] = {"api": [proc.pid], "postgres": db.pids()}, 0
        try:
            for number, results in enumerate(rounds):
                if number and bare is not None:
                    results["ping"] = run_load(args, "ping", bare_url, bare_target)
                for scenario in api:
                    profile = None
                    if args.profile:
                        profile = args.profile / f"{kind}-{scenario}-{number + 1}.txt"
                    results[scenario] = run_load(args, scenario, url, target, profile)
                    if scenario == "rewards":
                        target["first"] += results[scenario]["sent"]
        finally:
            stop_server(proc)
        if "rewards" in api:
            done = data.completed_requests(settings, target["rewards_run"])
            notes.append(
                f"{kind} rewards: {done - data.DUPLICATES} requests completed in the database "
                f"for {target['first']} callbacks sent (of {target['open']} open; the last ones "
                "in flight when each load stopped may be missing either side)"
            )
    finally:
        from service.db import get_engine

        if bare is not None:
            stop_server(bare)
        get_engine(db.settings.resolved_database_url).dispose()
        db.close()
    return rounds, notes


# --- the report ----------------------------------------------------------------------------------


def rate_of(res: dict) -> float:
    """Responses received per second of the measured window."""
    return len(res["times"]) / res["window_s"]


def server_cpu_ms(res: dict) -> float:
    """The server process's CPU per response, in ms."""
    return 1000 * res["cpu_s"]["api"] / len(res["times"])


def row(scenario: str, res: dict, ceiling: float | None) -> list[str]:
    n = len(res["times"])
    rate = rate_of(res)
    odd = ", ".join(f"{k}: {v}" for k, v in sorted(res["statuses"].items()) if not 200 <= k < 300)
    share = f"{rate / ceiling:.1%}" if ceiling else "-"
    cpu = res["cpu_s"]
    used = "/".join(
        f"{100 * cpu[side] / res['window_s']:.0f}" if side in cpu else "-"
        for side in ("api", "postgres", "load")
    )
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
        f"{server_cpu_ms(res):.2f}" if n else "-",
        used,
    ]


HEAD = [
    "scenario",
    "request",
    "requests",
    "req/s",
    "p50 ms",
    "p99 ms",
    "failures",
    "non-2xx",
    "req/s vs ping",
    "server CPU ms/req",
    "CPU % server/postgres/locust",
]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--databases", default=",".join(DATABASES), help=f"any of {DATABASES}")
    ap.add_argument("--users", type=int, default=16, help="concurrent locust users")
    ap.add_argument("--seconds", type=float, default=15, help="measured seconds per scenario")
    ap.add_argument(
        "--warmup",
        type=float,
        default=2,
        help="seconds of load before each measurement starts (not counted)",
    )
    ap.add_argument("--load-procs", type=int, default=1, help="locust processes sharing the users")
    ap.add_argument(
        "--rounds", type=int, default=3, help="rounds of every scenario, each with its own ping"
    )
    ap.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"any of {','.join(SCENARIOS)}"
    )
    ap.add_argument("--profile", type=Path, help="py-spy the API into this folder")
    ap.add_argument("--load", choices=list(SCENARIOS), help=argparse.SUPPRESS)
    ap.add_argument("--part", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--host", help=argparse.SUPPRESS)
    ap.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.serve_bare:
        serve_bare(args.serve_bare)
        return
    if args.load:
        print(json.dumps(load(args)))
        return
    scenarios, kinds = args.scenarios.split(","), args.databases.split(",")
    if unknown := (set(scenarios) - set(SCENARIOS)) | (set(kinds) - set(DATABASES)):
        sys.exit(f"unknown scenario(s) or database(s): {', '.join(sorted(unknown))}")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    started, blocks, notes = time.perf_counter(), {}, []
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        for kind in kinds:
            blocks[kind], said = run_block(args, kind, scenarios, Path(tmp))
            notes += said
    for kind, rounds in blocks.items():
        shares = {}  # scenario -> (share of its round's ping, server CPU ms/req) per round
        for number, results in enumerate(rounds, 1):
            notes += [
                f"{kind} {s}, round {number}: locust reported its CPU above 90% (the load "
                "generator is saturated)"
                for s, r in results.items()
                if r["cpu_warning"]
            ]
            ping = results.get("ping")
            ceiling = rate_of(ping) if ping else None
            common.print_table(
                f"{kind}, round {number} of {len(rounds)}: {args.users} locust users in "
                f"{args.load_procs} process(es) (FastHttpUser), no wait, {args.seconds:g} s per "
                f"scenario after {args.warmup:g} s warm-up, loopback; {server_settings()}; load "
                f"generator, server and database share {os.cpu_count()} cores",
                HEAD,
                [row(s, results[s], ceiling) for s in scenarios if s in results],
            )
            for s in scenarios:
                if s != "ping" and s in results and ceiling and results[s]["times"]:
                    res = results[s]
                    shares.setdefault(s, []).append((rate_of(res) / ceiling, server_cpu_ms(res)))
        if shares:
            common.print_table(
                f"{kind}: requests/s as a share of the same round's ping, each round and their "
                "median; the server's CPU ms per request (median)",
                ["scenario", "rounds", "median share", "server CPU ms/req"],
                [
                    [
                        s,
                        ", ".join(f"{share:.1%}" for share, _ in got),
                        f"{statistics.median(share for share, _ in got):.1%}",
                        f"{statistics.median(cpu for _, cpu in got):.2f}",
                    ]
                    for s, got in shares.items()
                ],
            )
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    for note in notes:
        print(f"\nnote: {note}")


if __name__ == "__main__":
    main()
