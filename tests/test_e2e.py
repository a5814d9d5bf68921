"""The main job end to end over real HTTP: API server and Celery worker as separate processes,
on SQLite and the file-backed broker, and on PostgreSQL and Redis as a cluster runs them."""

import signal
import subprocess
import sys
import tarfile
import threading
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from service.stack import stack_env
from workers.rollout.vllm import vllm_installed

from conftest import BACKENDS, backend_settings
from factories import (
    DROP,
    STACK_RUN,
    STANDARD_METRICS,
    WORKER_S,
    copy_rows,
    post_file,
    run_spec,
    wait_for_run,
    wait_until,
    write_jsonl,
)
from services import (
    cli,
    gvpo_up,
    process_tree,
    stack_project,
    stack_settings,
    start_stack,
    wait_grpc_serving,
)

pytestmark = pytest.mark.slow

ENDED = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module", params=BACKENDS)
def embedded(request, tmp_path_factory):
    """The stack, once per back end (PostgreSQL + Redis: a database of the session's cluster)."""
    settings = stack_settings(
        tmp_path_factory.mktemp("stack"), **backend_settings(request, request.param)
    )
    cli(settings, "db", "upgrade")
    stack = start_stack(settings, settings.resolved_data_dir / "logs")
    yield stack
    stack.stop()


def spec(model_dir, train_file: str, *layers: dict, **sections) -> dict:
    """The copy task as these tests train it on the stack's worker (STACK_RUN)."""
    return run_spec(model_dir, train_file, STACK_RUN, *layers, **sections)


# ---------------------------------------------------------------- one run, start to end


@pytest.fixture(scope="module")
def trained(embedded, tiny_model_dir, tmp_path_factory) -> SimpleNamespace:
    """A project's client, its 40-row training file and a run on it trained to its end by the
    worker process (once per back end)."""
    key = cli(embedded.settings, "api-key", "create", "--project", "acceptance")
    http = httpx.Client(
        base_url=embedded.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    data = write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", copy_rows(40))
    upload = post_file(http, None, data.read_bytes())
    assert upload.status_code == 201 and upload.json()["rows"] == 40
    created = http.post("/v1/runs", json=spec(tiny_model_dir, upload.json()["id"]))
    assert created.status_code == 201, created.text
    run = wait_for_run(http, created.json()["id"], ENDED)
    return SimpleNamespace(http=http, run=run, file_id=upload.json()["id"])


def test_a_run_trains_to_its_end_through_the_http_api(trained):
    http, run = trained.http, trained.run
    assert run["status"] == "succeeded", run["error"]
    assert run["step"] == run["total_steps"] == 8
    metrics = http.get(f"/v1/runs/{run['id']}/metrics").json()["metrics"]
    for name in STANDARD_METRICS:
        assert [s for s, _ in metrics[name]] == list(range(1, 9)), name


def test_the_worker_rolls_out_with_the_auto_engine_in_step_with_the_learner(trained):
    """engine "auto" in a real worker process: vLLM where installed, with its log-probs in step
    with the learner."""
    http, run = trained.http, trained.run
    events = http.get(f"/v1/runs/{run['id']}/events").json()["data"]
    loaded = next(e for e in events if e["type"] == "run.model_loaded")
    assert loaded["data"]["rollout_engine"] == ("vllm" if vllm_installed() else "hf")
    if vllm_installed():
        metrics = http.get(f"/v1/runs/{run['id']}/metrics").json()["metrics"]
        assert max(v for _, v in metrics["rollout/logprob_diff_max"]) < 1e-4


def test_a_finished_run_shows_its_last_steps_samples(trained):
    samples = trained.http.get(f"/v1/runs/{trained.run['id']}/samples", params={"step": 8}).json()
    assert len(samples["data"]) == 16 and {s["group_index"] for s in samples["data"]} == {
        0,
        1,
        2,
        3,
    }


def test_the_last_checkpoint_downloads_as_a_model_that_generates(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    http, run = trained.http, trained.run
    ckpts = http.get(f"/v1/runs/{run['id']}/checkpoints").json()["data"]
    assert [c["step"] for c in ckpts] == [4, 8]
    archive = tmp_path / "ckpt.tar.gz"
    with http.stream("GET", f"/v1/runs/{run['id']}/checkpoints/{ckpts[-1]['id']}/download") as resp:
        assert resp.status_code == 200
        archive.write_bytes(resp.read())
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "ckpt", filter="data")
    loaded = tmp_path / "ckpt" / ckpts[-1]["id"]
    model = AutoModelForCausalLM.from_pretrained(loaded)
    tokenizer = AutoTokenizer.from_pretrained(loaded)
    ids = tokenizer("abc=", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] == 4 + 3


@pytest.fixture(scope="module")
def rescored(trained) -> dict:
    """The trained run re-scored with exact_match by the worker: the finished rescore."""
    http, run = trained.http, trained.run
    rescore = http.post(
        f"/v1/runs/{run['id']}/rescore", json={"reward": {"type": "builtin", "name": "exact_match"}}
    )
    assert rescore.status_code == 202, rescore.text
    url = f"/v1/runs/{run['id']}/rescores/{rescore.json()['id']}"

    def ended() -> dict | None:
        done = http.get(url).json()
        return done if done["status"] not in ("queued", "running") else None

    return wait_until(ended, WORKER_S, "the rescore to end", every=0.3)


def test_the_worker_rescores_every_sample_of_a_finished_run(rescored):
    assert (rescored["status"], rescored["samples_scored"]) == ("succeeded", 8 * 4 * 4), rescored


def test_a_run_goes_on_from_the_checkpoint_with_rescored_and_posted_groups(trained, rescored):
    """A new run starts from the first run's checkpoint and trains on its re-scored groups, and
    on a group posted to it, with no rollouts."""
    http, run = trained.http, trained.run
    ckpt_id = http.get(f"/v1/runs/{run['id']}/checkpoints").json()["data"][-1]["id"]
    body = spec(
        run["spec"]["model"]["path"],
        trained.file_id,
        model={"path": DROP, "checkpoint": ckpt_id},
        rollout={"engine": "hf"},
        dataset={"offpolicy_file": rescored["file_id"]},
        training={"steps": 2, "offpolicy_fraction": 1.0},
    )
    created = http.post("/v1/runs", json=body)
    assert created.status_code == 201, created.text
    posted = {
        "prompt": "abc=",
        "answer": "abc",
        "completions": ["abc", "ab", "b", "abcd"],
        "source": "teacher",
    }
    assert (
        http.post(f"/v1/runs/{created.json()['id']}/groups", json={"groups": [posted]}).status_code
        == 202
    )
    second = wait_for_run(http, created.json()["id"], ENDED)
    assert second["status"] == "succeeded", second["error"]
    assert second["tokens_generated"] == 0
    sources = {
        s["source"]
        for step in (1, 2)
        for s in http.get(f"/v1/runs/{second['id']}/samples", params={"step": step}).json()["data"]
    }
    assert sources == {"teacher", run["id"]}


# ---------------------------------------------------------------- more of the stack


@pytest.mark.one_backend("sqlite")  # the subject is the worker, not the database
def test_grpc_and_the_cli_follow_a_run_live(embedded, tiny_model_dir):
    """The API process serves gRPC beside REST: a run created over gRPC is watched to its end
    over gRPC while `gvpo runs watch` follows the same run over SSE."""
    import grpc
    from google.protobuf.struct_pb2 import Struct

    from gvpo.v1 import runs_pb2, runs_pb2_grpc

    http, file_id = stack_project(embedded, "watchers")
    key = http.headers["Authorization"].removeprefix("Bearer ")
    body = Struct()
    body.update(spec(tiny_model_dir, file_id))
    with grpc.insecure_channel(f"127.0.0.1:{embedded.settings.grpc_port}") as channel:
        wait_grpc_serving(channel)
        runs = runs_pb2_grpc.RunsStub(channel)
        metadata = (("authorization", f"Bearer {key}"),)
        run = runs.CreateRun(runs_pb2.CreateRunRequest(spec=body), metadata=metadata).run
        watch = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "runs", "watch", run.id],
            env={**stack_env(embedded.settings), "GVPO_API_KEY": key, "COLUMNS": "160"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        updates = list(
            runs.WatchRun(runs_pb2.WatchRunRequest(run_id=run.id), metadata=metadata, timeout=180)
        )
    shown, _ = watch.communicate(timeout=WORKER_S)
    assert watch.returncode == 0, shown
    assert "run.started" in shown and "run.succeeded" in shown and "8/8" in shown, shown
    assert "reward " in shown and "loss " in shown, shown

    assert [u.run for u in updates if u.HasField("run")][-1].status == "succeeded"
    streamed = {
        u.metrics.step: u.metrics.values["reward/mean"] for u in updates if u.HasField("metrics")
    }
    stored = http.get(f"/v1/runs/{run.id}/metrics", params={"names": "reward/mean"}).json()
    assert streamed == {step: value for step, value in stored["metrics"]["reward/mean"]}
    assert [u.event.type for u in updates if u.HasField("event")][-1] == "run.succeeded"


@pytest.mark.one_backend("postgres")  # the subject is the worker, not the database
def test_grpo_and_lora_runs_through_the_same_api(embedded, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    http, file_id = stack_project(embedded, "variants")
    grpo = spec(
        tiny_model_dir,
        file_id,
        training={"steps": 3},
        algorithm={"name": "grpo", "group_size": 4, "beta": DROP, "reference": DROP},
    )
    lora = spec(
        tiny_model_dir, file_id, training={"steps": 4}, model={"lora": {"r": 4, "alpha": 8}}
    )
    runs = [http.post("/v1/runs", json=body).json() for body in (grpo, lora)]
    for run in runs:
        done = wait_for_run(http, run["id"], {"succeeded", "failed"})
        assert done["status"] == "succeeded", done["error"]
    ckpt = http.get(f"/v1/runs/{runs[1]['id']}/checkpoints").json()["data"][-1]
    assert ckpt["kind"] == "lora_adapter"
    url = f"/v1/runs/{runs[1]['id']}/checkpoints/{ckpt['id']}/download"
    for fmt, expected in (("stored", "adapter_config.json"), ("merged", "model.safetensors")):
        archive = tmp_path / f"{fmt}.tar.gz"
        archive.write_bytes(http.get(url, params={"format": fmt}).content)
        with tarfile.open(archive) as tar:
            names = {Path(n).name for n in tar.getnames()}
            tar.extractall(tmp_path / fmt, filter="data")
        assert expected in names, names
    AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / ckpt["id"])


@pytest.mark.one_backend("postgres")  # the subject is the worker, not the database
def test_a_run_on_two_processes_through_the_worker(embedded, tiny_model_dir):
    """The Celery pool child (daemonic: no multiprocessing children) starts torchrun; each rank
    rolls out with its own engine (`auto`: vLLM where installed) and rank 0 records."""
    http, file_id = stack_project(embedded, "two-procs")
    body = spec(
        tiny_model_dir,
        file_id,
        training={"steps": 4},
        resources={"processes": 2, "strategy": "fsdp"},
    )
    run = wait_for_run(http, http.post("/v1/runs", json=body).json()["id"], ENDED)
    assert run["status"] == "succeeded", run["error"]
    events = http.get(f"/v1/runs/{run['id']}/events").json()["data"]
    launched = next(e for e in events if e["type"] == "run.launched")
    loaded = next(e for e in events if e["type"] == "run.model_loaded")
    assert launched["data"]["ranks"] == loaded["data"]["ranks"] == 2
    assert loaded["data"]["rollout_engine"] == ("vllm" if vllm_installed() else "hf")
    metrics = http.get(f"/v1/runs/{run['id']}/metrics").json()["metrics"]
    assert [s for s, _ in metrics["loss"]] == [1, 2, 3, 4]
    if vllm_installed():  # each weight sync gathers the FSDP shards whole
        assert max(v for _, v in metrics["rollout/logprob_diff_max"]) < 1e-4
    samples = http.get(f"/v1/runs/{run['id']}/samples", params={"step": 4}).json()["data"]
    assert sorted({s["group_index"] for s in samples}) == [0, 1, 2, 3]  # both ranks' groups


@pytest.mark.one_backend("sqlite")  # the worker's answer
def test_a_missing_model_is_refused_or_fails_the_run_saying_why(embedded, tmp_path):
    http, file_id = stack_project(embedded, "faults")

    missing = spec(tmp_path / "missing-model", file_id)
    if embedded.settings.embedded:  # the API sees what the worker would: refused at submission
        error = http.post("/v1/runs", json=missing)
        assert error.status_code == 422, error.text
        assert [f["field"] for f in error.json()["error"]["details"]["fields"]] == ["model.path"]
        assert "no such directory" in error.json()["error"]["message"]
        return
    bad = http.post("/v1/runs", json=missing).json()  # a cluster's API leaves it to the worker
    failed = wait_for_run(http, bad["id"], {"succeeded", "failed"})
    assert failed["status"] == "failed" and "does not exist" in failed["error"]
    events = http.get(f"/v1/runs/{bad['id']}/events").json()["data"]
    assert events[-1]["type"] == "run.failed" and "missing-model" in events[-1]["message"]


def test_cancel_a_running_run(embedded, tiny_model_dir):
    http, file_id = stack_project(embedded, "cancel")
    long = http.post(
        "/v1/runs", json=spec(tiny_model_dir, file_id, training={"steps": 100000})
    ).json()
    wait_until(
        lambda: http.get(f"/v1/runs/{long['id']}").json()["step"] >= 2,
        WORKER_S,
        "the run to reach step 2",
        every=0.2,
    )
    # Prometheus, scraped from the API while the worker trains
    from prometheus_client.parser import text_string_to_metric_families

    scraped = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(httpx.get(f"{embedded.url}/metrics").text)
        for s in f.samples
    }
    assert scraped[("gvpo_runs", (("state", "running"),))] >= 1
    ages = [
        v
        for (name, labels), v in scraped.items()
        if name == "gvpo_worker_heartbeat_age_seconds" and ("run_id", long["id"]) in labels
    ]
    assert len(ages) == 1 and 0 <= ages[0] < embedded.settings.lease_seconds
    learn = scraped[("gvpo_step_phase_seconds", (("phase", "learn"), ("run_id", long["id"])))]
    assert 0 < learn < 60
    assert http.post(f"/v1/runs/{long['id']}/cancel").status_code == 200
    run = wait_for_run(http, long["id"], ENDED, timeout=WORKER_S)
    assert run["status"] == "cancelled" and 2 <= run["step"] < 100000


def test_gvpo_up_stops_cleanly_on_ctrl_c(tmp_path):
    up, url = gvpo_up(stack_settings(tmp_path / "up-stack"))
    assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    stack = process_tree(up.pid)
    assert len(stack) >= 4  # gvpo up, the API, the worker and its pool child
    up.send_signal(signal.SIGINT)
    assert up.wait(timeout=60) == 0  # the stack stops its children within their grace
    wait_until(
        lambda: not stack & process_tree(1),
        30,  # none of them is left anywhere
        "every process of the stack to exit",
    )
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/readyz", timeout=1)


# ---------------------------------------------------------------- the CLI client


@pytest.fixture(scope="module")
def cli_project(embedded, tiny_model_dir, tmp_path_factory) -> SimpleNamespace:
    """The `gvpo` client commands of a new project on the stack (`run(*args)`), the id of the
    training file it uploaded with `gvpo files upload`, and a run it made with `gvpo submit
    --wait` (once per back end)."""
    import json

    import yaml

    settings, tmp_path = embedded.settings, tmp_path_factory.mktemp("cli")
    key = cli(settings, "api-key", "create", "--project", "cli")
    client = settings.model_copy(update={"api_key": key})

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "service.cli", *args],
            capture_output=True,
            text=True,
            timeout=300,
            env={**stack_env(client), "GVPO_API_KEY": key, "GVPO_API_URL": embedded.url},
        )

    data = write_jsonl(tmp_path / "train.jsonl", copy_rows(16))
    uploaded = run("files", "upload", str(data), "--json")
    assert uploaded.returncode == 0, uploaded.stderr
    file_id = json.loads(uploaded.stdout)["id"]
    spec_path = tmp_path / "run.yaml"
    spec_path.write_text(yaml.safe_dump(spec(tiny_model_dir, file_id, training={"steps": 3})))
    submitted = run("submit", str(spec_path), "--wait", "-q")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    run_id = submitted.stdout.split()[0]  # the id, then the progress
    return SimpleNamespace(run=run, file_id=file_id, run_id=run_id, tmp_path=tmp_path)


@pytest.mark.one_backend("sqlite")  # the CLI is a client of the API
def test_the_cli_lists_the_run_it_submitted_and_waited_for(cli_project):
    listed = cli_project.run("runs", "list")
    assert cli_project.run_id in listed.stdout and "succeeded" in listed.stdout


@pytest.mark.one_backend("sqlite")  # the CLI is a client of the API
def test_the_cli_names_the_apis_refusals_on_stderr(cli_project):
    bad = cli_project.run("runs", "show", "run_does_not_exist")
    assert bad.returncode == 1 and "404 not_found" in bad.stderr
    # a finished run can be neither paused nor resumed (409)
    paused = cli_project.run("runs", "pause", cli_project.run_id)
    assert paused.returncode == 1 and "409 conflict" in paused.stderr
    resumed = cli_project.run("runs", "resume", cli_project.run_id)
    assert resumed.returncode == 1 and "only a paused run" in resumed.stderr
    assert "Traceback" not in bad.stderr + paused.stderr + resumed.stderr


@pytest.mark.one_backend("sqlite")  # the CLI is a client of the API
def test_the_cli_rescores_a_run_and_posts_its_groups_to_another(cli_project, tiny_model_dir):
    """Re-score the finished run by the worker, download its groups, and post them to a new
    run that has off-policy slots (paused before its first step: the groups wait for its
    steps)."""
    import json

    import yaml

    run, tmp_path = cli_project.run, cli_project.tmp_path
    reward = tmp_path / "reward.yaml"
    reward.write_text("type: builtin\nname: exact_match\n")
    rescored = run("runs", "rescore", cli_project.run_id, str(reward), "--wait")
    assert rescored.returncode == 0, rescored.stdout + rescored.stderr
    result = json.loads(rescored.stdout)
    assert (result["status"], result["samples_scored"]) == ("succeeded", 3 * 4 * 4)
    groups = tmp_path / "groups.jsonl"
    assert run("files", "download", result["file_id"], str(groups)).returncode == 0
    assert len(groups.read_text().splitlines()) == 3 * 4
    spec_path = tmp_path / "offpolicy-run.yaml"
    spec_path.write_text(
        yaml.safe_dump(
            spec(
                tiny_model_dir,
                cli_project.file_id,
                training={"steps": 3, "offpolicy_fraction": 0.5},
            )
        )
    )
    paused_run = run("submit", str(spec_path), "-q").stdout.strip()
    run("runs", "pause", paused_run)
    added = run("runs", "add-groups", paused_run, str(groups))
    assert added.returncode == 0, added.stderr
    assert f"posted {3 * 4}/{3 * 4} groups; {3 * 4} wait" in added.stdout


def test_a_dry_run_is_answered_by_the_worker_while_the_api_stays_responsive(embedded, trained):
    """POST /v1/gvpo:dry_run goes to the worker (the API process loads no model); while it
    waits, the API answers its health checks."""
    body = {
        "model": {"run_id": trained.run["id"]},
        "prompt": "abc=",
        "completions": ["abc", "xy"],
        "rewards": [1.0, 0.0],
        "beta": 0.1,
    }
    answer: dict = {}
    asking = threading.Thread(
        target=lambda: answer.update(
            dry=trained.http.post("/v1/gvpo:dry_run", json=body, timeout=2 * WORKER_S)
        )
    )
    asking.start()
    health = []
    with httpx.Client(base_url=embedded.url, timeout=10) as probe:
        while asking.is_alive():
            health.append((probe.get("/healthz").status_code, probe.get("/readyz").status_code))
            asking.join(0.1)  # paces the probes; returns as soon as the answer came
    assert answer["dry"].status_code == 200, answer["dry"].text
    got = answer["dry"].json()
    assert [c["completion"] for c in got["completions"]] == ["abc", "xy"]
    assert sum(c["weight"] for c in got["completions"]) == pytest.approx(0.0, abs=1e-5)
    assert health and set(health) == {(200, 200)}, health
    worker_log = (embedded.settings.resolved_data_dir / "logs" / "worker.log").read_text()
    assert "Task gvpo.dry_run[" in worker_log and "succeeded" in worker_log
