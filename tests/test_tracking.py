"""Experiment trackers (the spec's `tracking`): a run's metrics, spec and checkpoints copied to
a real MLflow tracking server (read back with MLflow's own client), to W&B in offline mode
(read back from its run file) and to TensorBoard event files (read back with TensorBoard's
reader), each compared with what the service recorded; a tracker that fails costs a warning,
never the run; a resumed run goes on with the same MLflow run."""

import json
import struct
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from run_control import (
    RESUMABLE_STEPS,
    act,
    event_types,
    execute_in_thread,
    kill_after_first_checkpoint,
    resumable,
    series,
    wait_for_step,
)
from sqlalchemy import select

from service.db import session_scope
from service.models import RunEvent
from workers.execute import execute_run
from workers.tracking.base import tracker_name
from workers.tracking.tensorboard_sink import tensorboard_dir

from factories import (
    EXACT_MATCH,
    SPEC_DEFAULTS,
    STACK_RUN,
    WORKER_S,
    auth,
    copy_rows,
    run_spec,
    submit,
    upload,
    wait_for_run,
    wait_until,
)
from services import (
    MLFLOW,
    cli,
    closed_port,
    stack_project,
    stack_settings,
    start_mlflow,
    start_stack,
    stop_group,
)

pytestmark = pytest.mark.slow

STEPS = 4  # a checkpoint and an evaluation every 2
EXPERIMENT = "gvpo-tests"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    if not (MLFLOW / "mlflow").exists():
        pytest.skip("no MLflow server to test against: `make mlflow-venv` installs one")
    proc, url = start_mlflow(tmp_path_factory.mktemp("mlflow"))
    yield url
    stop_group(proc)


@pytest.fixture(scope="module")
def wandb_home(tmp_path_factory):
    """W&B's own folders (config, cache, staging) in a temporary place, not the user's."""
    root = tmp_path_factory.mktemp("wandb-home")
    with pytest.MonkeyPatch.context() as patch:
        for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            patch.setenv(name, str(root / name.lower()))
        patch.setenv("WANDB_SILENT", "true")
        yield root


# ---------------------------------------------------------------- reading the trackers back

READ_MLFLOW = """
import json, sys
from mlflow import MlflowClient

url, run_id, out = sys.argv[1:4]
client = MlflowClient(url)
experiments = [e.experiment_id for e in client.search_experiments()]
found = client.search_runs(experiments, filter_string=f"tags.`gvpo.run_id` = '{run_id}'")

def files(run, path=None):
    for a in client.list_artifacts(run, path):
        yield from files(run, a.path) if a.is_dir else [a.path]

runs = []
for r in found:
    rid = r.info.run_id
    artifacts = sorted(files(rid))
    spec = None
    if "gvpo/spec.json" in artifacts:
        spec = json.load(open(client.download_artifacts(rid, "gvpo/spec.json", out)))
    runs.append({
        "status": r.info.status, "name": r.info.run_name,
        "experiment": client.get_experiment(r.info.experiment_id).name,
        "params": r.data.params, "tags": r.data.tags, "artifacts": artifacts, "spec": spec,
        "metrics": {k: [[m.step, m.value] for m in client.get_metric_history(rid, k)]
                    for k in r.data.metrics},
    })
print(json.dumps(runs))
"""


def mlflow_runs(url: str, run_id: str, tmp: Path) -> list[dict]:
    """The MLflow runs tagged with the service's `run_id`, as MLflow's own client reads them
    (in the MLflow server's venv)."""
    out = subprocess.run(
        [str(MLFLOW / "python"), "-c", READ_MLFLOW, url, run_id, str(tmp)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def wandb_records(run_folder: Path) -> list:
    """Every record of the run's offline W&B run files, oldest first. A .wandb file is W&B's
    LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks (checksum, length, type:
    1 whole, 2 first, 3 middle, 4 last), each record a protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    records = []
    for path in sorted(run_folder.glob("wandb/offline-run-*/run-*.wandb")):
        raw = path.read_bytes()
        assert raw[:4] == b":W&B"
        pos, parts = 7, b""
        while pos + 7 <= len(raw):
            if (left := 32768 - pos % 32768) < 7:
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
            if kind == 0:
                break
            parts += raw[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(parts)
                records.append(record)
                parts = b""
    return records


def wandb_history(records: list) -> dict[str, list[list[float]]]:
    series: dict[str, list[list[float]]] = {}
    for record in records:
        if record.WhichOneof("record_type") != "history":
            continue
        row = {
            i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item
        }
        step = row.pop("_step")
        for name, value in row.items():
            if not name.startswith("_"):
                series.setdefault(name, []).append([step, value])
    return series


def tensorboard_scalars(folder: Path) -> dict[str, list[list[float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [[e.step, e.value] for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def same_series(got: list, expected: list, rel: float = 1e-9) -> bool:
    return [s for s, _ in got] == [s for s, _ in expected] and all(
        v == pytest.approx(e, rel=rel, nan_ok=True)
        for (_, v), (_, e) in zip(got, expected, strict=True)
    )


# ---------------------------------------------------------------- one run, every tracker


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_model_dir, mlflow_server, wandb_home):
    """A run tracked by MLflow, W&B (offline) and TensorBoard at once, with an evaluation and
    a checkpoint every 2 steps, submitted over HTTP to the embedded stack (API and worker
    processes) and trained to its end; the API's view of it."""
    settings = stack_settings(tmp_path_factory.mktemp("stack"), webhook_allow_private=True)
    cli(settings, "db", "upgrade")
    stack = start_stack(settings, settings.resolved_data_dir / "logs")
    try:
        http, train_file = stack_project(stack, "tracked")
        eval_file = upload(http, None, copy_rows(3), "eval", "eval.jsonl")
        body = run_spec(
            tiny_model_dir,
            train_file,
            STACK_RUN,
            training={"steps": STEPS},
            rollout={"engine": "hf"},
            dataset={"eval_file": eval_file},
            eval={"every_steps": 2, "samples_per_prompt": 2},
            checkpoint={"every_steps": 2, "keep_last": 1},
            tracking={
                "mlflow": {"uri": mlflow_server, "experiment": EXPERIMENT},
                "wandb": {"project": "gvpo-tests", "mode": "offline"},
                "tensorboard": True,
            },
        )
        created = http.post("/v1/runs", json=body)
        assert created.status_code == 201, created.text
        run_id = created.json()["id"]
        run = wait_for_run(http, run_id, {"succeeded", "failed", "cancelled"})
        # the worker ends the trackers' runs just after the run's own end
        folder = settings.runs_dir / run_id
        wait_until(
            lambda: ended(mlflow_server, run_id, folder, tmp_path_factory),
            60,
            "the MLflow and W&B runs to end",
            every=1,
        )
        yield SimpleNamespace(
            run=run,
            metrics=http.get(f"/v1/runs/{run_id}/metrics").json()["metrics"],
            events=http.get(f"/v1/runs/{run_id}/events").json()["data"],
            folder=folder,
            mlflow=mlflow_runs(mlflow_server, run_id, tmp_path_factory.mktemp("download")),
        )
    finally:
        stack.stop()


def ended(url: str, run_id: str, folder: Path, tmp_path_factory) -> bool:
    """Whether the MLflow run has ended and the W&B run file has its exit record."""
    kinds = [r.WhichOneof("record_type") for r in wandb_records(folder)]
    if "exit" not in kinds:
        return False
    runs = mlflow_runs(url, run_id, tmp_path_factory.mktemp("poll"))
    return bool(runs) and runs[0]["status"] != "RUNNING"


def test_the_run_records_steps_and_evaluations(tracked):
    assert tracked.run["status"] == "succeeded", tracked.run["error"]
    assert [s for s, _ in tracked.metrics["loss"]] == list(range(1, STEPS + 1))
    assert [s for s, _ in tracked.metrics["eval/pass@1"]] == [2, 4]


def test_each_tracker_says_where_it_logs_in_the_runs_events(tracked):
    started = {e["data"]["tracker"]: e for e in tracked.events if e["type"] == "tracking.started"}
    assert sorted(started) == ["mlflow", "tensorboard", "wandb"]
    assert started["mlflow"]["data"]["url"].endswith(started["mlflow"]["data"]["run_id"])
    assert started["wandb"]["data"]["run_id"] == tracked.run["id"]
    assert "tracking.failed" not in [e["type"] for e in tracked.events]


def test_mlflow_has_every_metric_the_service_recorded_with_its_steps_and_values(tracked):
    (mlflow,) = tracked.mlflow  # one MLflow run for the service's run
    assert sorted(mlflow["metrics"]) == sorted(tracker_name(n) for n in tracked.metrics)
    for name, expected in tracked.metrics.items():
        assert same_series(mlflow["metrics"][tracker_name(name)], expected), name
    assert mlflow["status"] == "FINISHED" and mlflow["experiment"] == EXPERIMENT


def test_mlflow_has_the_spec_as_parameters_and_as_an_artifact(tracked):
    (mlflow,) = tracked.mlflow
    spec = tracked.run["spec"]
    assert mlflow["spec"] == spec
    assert mlflow["params"]["training.steps"] == str(STEPS)
    assert mlflow["params"]["tracking.mlflow.experiment"] == EXPERIMENT
    assert mlflow["params"]["sampling.stop"] == "[]"  # a list: JSON
    assert mlflow["tags"]["gvpo.run_id"] == tracked.run["id"]
    assert mlflow["name"] == tracked.run["id"]  # the spec names none


def test_mlflow_has_each_checkpoint_as_artifacts(tracked):
    (mlflow,) = tracked.mlflow
    last = tracked.folder / "checkpoints" / f"step_{STEPS:06d}"  # kept (keep_last 1)
    files = sorted(p.relative_to(last).as_posix() for p in last.rglob("*") if p.is_file())
    assert files
    for step in (2, STEPS):
        prefix = f"checkpoints/step_{step:06d}/"
        got = [a[len(prefix) :] for a in mlflow["artifacts"] if a.startswith(prefix)]
        assert got == files, step


def test_wandb_offline_has_every_metric_the_config_and_the_checkpoints(tracked):
    records = wandb_records(tracked.folder)
    history = wandb_history(records)
    assert sorted(history) == sorted(tracked.metrics)
    for name, expected in tracked.metrics.items():
        assert same_series(history[name], expected), name
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.run_id == tracked.run["id"]
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["training"] == tracked.run["spec"]["training"]
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert [(a.type, sorted(a.aliases)) for a in artifacts] == [
        ("model", ["latest", "step-2"]),
        ("model", ["latest", f"step-{STEPS}"]),
    ]


def test_tensorboard_event_files_hold_every_metric(tracked):
    scalars = tensorboard_scalars(tensorboard_dir(tracked.folder))
    assert sorted(scalars) == sorted(tracker_name(n) for n in tracked.metrics)
    for name, expected in tracked.metrics.items():
        assert same_series(scalars[tracker_name(name)], expected, rel=1e-6), name  # float32


# ---------------------------------------------------------------- failures and resumes


@pytest.fixture
def loopback(settings):
    return settings.model_copy(update={"webhook_allow_private": True})


def _events(settings, run_id: str, type_: str) -> list[RunEvent]:
    with session_scope(settings.resolved_database_url) as session:
        return list(
            session.scalars(
                select(RunEvent).where(RunEvent.run_id == run_id, RunEvent.type == type_)
            )
        )


def test_a_tracking_server_that_is_down_costs_a_warning_not_the_run(loopback, tiny_model_dir):
    with closed_port() as port:
        run_id = submit(
            loopback,
            tiny_model_dir,
            training={"steps": 2},
            tracking={"mlflow": {"uri": f"http://127.0.0.1:{port}"}},
        )
        started = time.monotonic()
        assert execute_run(loopback, run_id, "worker-a") == "succeeded"
        took = time.monotonic() - started
    (failed,) = _events(loopback, run_id, "tracking.failed")
    assert failed.level == "warning" and failed.data["tracker"] == "mlflow"
    assert failed.data["during"] == "start" and "127.0.0.1" in failed.data["error"]
    assert took < 120  # a few seconds of tries, not the mlflow library's minutes


def test_a_resumed_run_goes_on_with_the_same_mlflow_run_without_repeating_a_step(
    loopback, tiny_model_dir, mlflow_server, tmp_path
):
    run_id = resumable(
        loopback,
        tiny_model_dir,
        "initial",
        None,
        tracking={"mlflow": {"uri": mlflow_server, "experiment": "resumed"}, "tensorboard": True},
    )
    kill_after_first_checkpoint(loopback, run_id)
    assert execute_run(loopback, run_id, "worker-b") == "succeeded"
    assert "run.resumed" in event_types(loopback, run_id)
    (mlflow,) = mlflow_runs(mlflow_server, run_id, tmp_path)
    assert mlflow["status"] == "FINISHED"
    assert len(mlflow["metrics"]) > 10
    for name, steps in mlflow["metrics"].items():  # each step once, as the service has them
        recorded = sorted(series(loopback, run_id, name.replace("_at_", "@")))
        assert [s for s, _ in steps] == recorded, name
    assert max(series(loopback, run_id, "loss")) == RESUMABLE_STEPS
    started = _events(loopback, run_id, "tracking.started")
    assert [e.data.get("continued") for e in started if e.data["tracker"] == "mlflow"][-1]


def test_a_paused_run_keeps_its_mlflow_run_open_and_goes_on_with_it(
    loopback, tiny_model_dir, mlflow_server, tmp_path
):
    run_id = submit(
        loopback,
        tiny_model_dir,
        training={"steps": 6},
        checkpoint={"every_steps": 100, "keep_last": None},
        tracking={"mlflow": {"uri": mlflow_server, "experiment": "paused"}},
    )
    worker, result = execute_in_thread(loopback, run_id, "worker-a")
    wait_for_step(loopback, run_id, 2)
    act(loopback, "pause", run_id)
    worker.join(timeout=WORKER_S)
    assert result["status"] == "paused"
    (paused,) = mlflow_runs(mlflow_server, run_id, tmp_path / "paused")
    assert paused["status"] == "RUNNING"  # MLflow has no paused state; the run goes on

    act(loopback, "resume", run_id)
    assert execute_run(loopback, run_id, "worker-b") == "succeeded"
    (ended,) = mlflow_runs(mlflow_server, run_id, tmp_path / "ended")
    assert ended["status"] == "FINISHED"
    assert [s for s, _ in ended["metrics"]["loss"]] == list(range(1, 7))
    assert sorted(series(loopback, run_id, "loss").items()) == [
        tuple(point) for point in ended["metrics"]["loss"]
    ]


@pytest.mark.parametrize(
    ("tracking", "field", "needle"),
    [
        ({"mlflow": {"uri": "http://127.0.0.1:9"}}, "tracking.mlflow.uri", "loopback"),
        ({"mlflow": {"uri": "ftp://example.org/x"}}, "tracking.mlflow.uri", "http(s)"),
        ({"mlflow": {"uri": "http://u:p@example.org"}}, "tracking.mlflow.uri", "credentials"),
        ({"wandb": {"project": "p", "mode": "sometimes"}}, "tracking.wandb.mode", "offline"),
        ({"wandb": {"project": "a/b"}}, "tracking.wandb.project", "pattern"),
        ({"tensorboard": True, "comet": {}}, "tracking.comet", "unknown field"),
    ],
)
def test_a_bad_tracking_section_is_a_422_naming_the_field(
    api, make_key, tiny_model_dir, tracking, field, needle
):
    key = make_key()
    train_file = upload(api, key, copy_rows(4), filename="t.jsonl")
    body = run_spec(
        tiny_model_dir, train_file, SPEC_DEFAULTS, reward=EXACT_MATCH, tracking=tracking
    )
    resp = api.post("/v1/runs", headers=auth(key), json=body)
    assert resp.status_code == 422, resp.text
    fields = resp.json()["error"]["details"]["fields"]
    assert [f["field"] for f in fields] == [field]
    assert needle in fields[0]["message"]


def test_no_tracking_section_starts_no_tracker(settings, tiny_model_dir):
    run_id = submit(settings, tiny_model_dir, training={"steps": 1})
    assert execute_run(settings, run_id, "worker-a") == "succeeded"
    assert not [t for t in event_types(settings, run_id) if t.startswith("tracking.")]
    assert not (settings.runs_dir / run_id / "wandb").exists()
    assert not tensorboard_dir(settings.runs_dir / run_id).exists()
