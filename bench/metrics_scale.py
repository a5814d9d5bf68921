"""Benchmark: a run's metrics and samples at scale, on SQLite and on PostgreSQL.

From the repository root (`make install-dev` first):

    .venv/bin/python bench/metrics_scale.py [--steps 100000] [--series 30] \
        [--databases sqlite,postgresql]

For each database, in a fresh data dir (PostgreSQL: a throwaway cluster on loopback, as the
tests start one):

1. Writes: `--window` steps recorded through the worker's own `RunRecorder.record_step`, each with
   `--series` metric values and `--samples` samples (prompts of 300 characters, completions of
   600), as a run records them: milliseconds per step (p50, p99), and the database's growth per
   1,000 steps, with every step's samples kept, with `retention: {samples_every_steps: 50,
   keep_last_steps: 10}`, and without samples.
2. Fill: the run's metrics are filled to `--steps` steps in bulk (plain INSERTs, then the
   rollups and their pages rebuilt as migrations 0017 and 0020 build them), then `--window`
   more steps are recorded through the recorder again: the write cost at that size.
3. Reads, over HTTP from the product's API server (`gvpo api`: one uvicorn process), one
   request at a time, after `--warmup` reads of each kind that are not counted (the server's
   first requests fill its caches): `--requests` reads of `--query-series` series with
   `max_points=1000` (what the dashboard asks for), of the list of series (`/metrics/names`),
   and a few reads of the same series in full, for contrast: latency p50 and p99 in ms, and
   the points returned.

The load generator is this process, so the reads measure the server's latency without
queueing; bench/api_load.py measures throughput under concurrent load.
"""

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

PROMPT, COMPLETION = "p" * 300, "c" * 600
SIZES = ("every step's samples", "retention 50/10", "no samples")


def new_run(settings, model: Path, retention: dict | None = None) -> tuple[str, str]:
    """A run (never started) and its project's API key."""
    from service.auth.service import create_api_key
    from service.db import session_scope

    spec = {
        "model": {"path": str(model)},
        "reward": {"type": "builtin", "name": "exact_match"},
        "sampling": {"max_new_tokens": 16},
        "retention": retention or {},
    }
    run_id = common.submit_run(settings, spec, [{"prompt": "a", "answer": "a"}], "rows.jsonl")
    with session_scope(settings.resolved_database_url) as session:
        _, key = create_api_key(session, "bench", settings.api_key_pepper)
    return run_id, key


def size_bytes(settings) -> int:
    from sqlalchemy import text

    from service.db import get_engine

    url = settings.resolved_database_url
    if url.startswith("sqlite"):
        with get_engine(url).connect() as conn:
            conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
            return conn.execute(
                text("SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()")
            ).scalar()
    # deleted rows (retention) hold their space until VACUUM FULL rewrites the tables; live
    # data is what is measured
    with get_engine(url).connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM FULL"))
        return conn.execute(text("SELECT pg_database_size(current_database())")).scalar()


def record(settings, run_id: str, steps: range, args, samples: bool, retention=None) -> list[float]:
    """Record `steps` through the worker's recorder; ms per step."""
    from workers.records import RunRecorder

    recorder = RunRecorder(settings, run_id, "bench")
    recorder.claim()
    rows = [
        {
            "group_index": i // 8,
            "sample_index": i % 8,
            "prompt": PROMPT,
            "completion": COMPLETION,
            "answer": "a",
            "reward": random.random(),
            "weight": random.random(),
            "logratio": random.random(),
        }
        for i in range(args.samples if samples else 0)
    ]
    names = [f"series/{i:02d}" for i in range(args.series)]
    times = []
    for step in steps:
        started = time.perf_counter()
        metrics = {name: random.gauss(0, 1) for name in names}
        recorder.record_step(step, metrics, rows, 1000, retention)
        times.append((time.perf_counter() - started) * 1000)
    return times


def fill(settings, run_id: str, first: int, last: int, series: int) -> float:
    """Metric values of steps first..last in bulk, then the rollups and pages rebuilt; seconds."""
    from sqlalchemy import insert, text

    from service.db import get_engine, session_scope
    from service.models import Metric
    from service.models.metric import rebuild_pages, rebuild_rollups

    started = time.perf_counter()
    names, now = [f"series/{i:02d}" for i in range(series)], time.time()
    for chunk in range(first, last + 1, 2000):
        rows = [
            {"run_id": run_id, "name": n, "step": s, "value": random.gauss(0, 1), "time": now}
            for s in range(chunk, min(chunk + 2000, last + 1))
            for n in names
        ]
        with session_scope(settings.resolved_database_url) as session:
            session.execute(insert(Metric), rows)
    with session_scope(settings.resolved_database_url) as session:
        rebuild_rollups(session, run_id)
        rebuild_pages(session, run_id)
    if not settings.resolved_database_url.startswith("sqlite"):
        # what autovacuum does to tables that grow step by step: fresh planner statistics
        with (
            get_engine(settings.resolved_database_url)
            .connect()
            .execution_options(isolation_level="AUTOCOMMIT") as conn
        ):
            conn.execute(text("ANALYZE"))
    return time.perf_counter() - started


def reads(url: str, key: str, run_id: str, args) -> dict:
    import httpx

    names = ",".join(f"series/{i:02d}" for i in range(args.query_series))
    out = {}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as http:
        cases = {
            "downsampled": ({"names": names, "max_points": 1000}, args.requests),
            "names": (None, args.requests),
            "full": ({"names": names}, 3),
        }
        for case, (params, n) in cases.items():
            path = f"/v1/runs/{run_id}/metrics" + ("/names" if params is None else "")
            for _ in range(args.warmup if n > args.warmup else 0):  # not counted
                http.get(path, params=params, timeout=600).raise_for_status()
            latencies, size = [], 0
            for _ in range(n):
                started = time.perf_counter()
                resp = http.get(path, params=params, timeout=600)
                latencies.append((time.perf_counter() - started) * 1000)
                resp.raise_for_status()
                size = len(resp.content)
            body = resp.json()
            points = sum(len(p) for p in body.get("metrics", {}).values())
            out[case] = {
                "p50_ms": common.percentile(latencies, 50),
                "p99_ms": common.percentile(latencies, 99),
                "requests": n,
                "points": points or len(body.get("data", [])),
                "bytes": size,
            }
    return out


def one_database(database: str, args, model: Path, work: Path) -> dict:
    from api_load import Database, start_server, stop_server

    from service.contract.spec import RetentionSpec
    from service.migrate import upgrade
    from service.stack import stack_env

    db = Database(database, work)  # bench/api_load.py's: a cluster's with its secrets
    try:
        settings = db.settings.model_copy(update={"model_roots": str(model.parent)})
        settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
        upgrade(settings.resolved_database_url, settings=settings)
        result = {"database": database}
        for label, samples, retention in (
            ("every step's samples", True, None),
            ("retention 50/10", True, {"samples_every_steps": 50, "keep_last_steps": 10}),
            ("no samples", False, None),
        ):
            run_id, _ = new_run(settings, model, retention)
            before = size_bytes(settings)
            kept = RetentionSpec(**retention) if retention else None
            ms = record(settings, run_id, range(1, args.window + 1), args, samples, kept)
            grown = (size_bytes(settings) - before) / args.window * 1000
            result[label] = {
                "write_p50_ms": common.percentile(ms, 50),
                "write_p99_ms": common.percentile(ms, 99),
                "mb_per_1000_steps": grown / 1e6,
            }
        run_id, key = new_run(settings, model)
        result["fill_s"] = fill(settings, run_id, 1, args.steps, args.series)
        later = range(args.steps + 1, args.steps + args.window + 1)
        ms = record(settings, run_id, later, args, True)
        result["write_at_scale"] = {
            "write_p50_ms": common.percentile(ms, 50),
            "write_p99_ms": common.percentile(ms, 99),
        }
        server = start_server(
            [sys.executable, "-m", "service.cli", "api"],
            {**stack_env(settings), "PYTHONUNBUFFERED": "1"},
            settings.resolved_api_url,
            "/readyz",
            work / f"api-{database}.log",
        )
        try:
            result["reads"] = reads(settings.resolved_api_url, key, run_id, args)
        finally:
            stop_server(server)
        return result
    finally:
        db.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--series", type=int, default=30)
    ap.add_argument("--query-series", type=int, default=20)
    ap.add_argument("--window", type=int, default=1000, help="steps recorded one by one")
    ap.add_argument("--samples", type=int, default=64, help="samples per step")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=5, help="reads of each kind first, not counted")
    ap.add_argument("--databases", default="sqlite,postgresql")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    random.seed(0)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = []
    with tempfile.TemporaryDirectory(prefix="gvpo-metrics-scale-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # PostgreSQL's cluster belongs to its own user when run as root
        model = work / "models" / "tiny"
        from workers.tiny_model import make_tiny_model

        make_tiny_model(model)
        for database in args.databases.split(","):
            results.append(one_database(database, args, model, work))
            print(json.dumps(results[-1], indent=1), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    table(results, args)


def table(results: list[dict], args) -> None:
    rows = []
    for r in results:
        reads = r["reads"]
        rows.append(
            [
                r["database"],
                *(
                    f"{r[k]['write_p50_ms']:.1f} / {r[k]['write_p99_ms']:.1f}"
                    for k in ("every step's samples", "write_at_scale")
                ),
                *(
                    f"{r[k]['mb_per_1000_steps']:.1f}"
                    for k in ("every step's samples", "retention 50/10", "no samples")
                ),
                f"{reads['downsampled']['p50_ms']:.1f} / {reads['downsampled']['p99_ms']:.1f}",
                f"{reads['names']['p50_ms']:.1f} / {reads['names']['p99_ms']:.1f}",
                f"{reads['full']['p50_ms']:.0f}",
            ]
        )
    common.print_table(
        f"{args.steps} steps x {args.series} series; reads of {args.query_series} series",
        [
            "database",
            "record_step ms p50/p99 (first steps)",
            f"at {args.steps} steps",
            "MB/1000 steps (all samples)",
            "(retention 50/10)",
            "(no samples)",
            "max_points=1000 ms p50/p99",
            "names ms p50/p99",
            "full read ms",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
