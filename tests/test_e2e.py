"""The main job end to end over real HTTP: API server and Celery worker as separate processes,
on SQLite and the file-backed broker, and on PostgreSQL and Redis as a cluster runs them."""

import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import pytest
from conftest import BACKENDS, backend_settings
from factories import auth, copy_rows, write_jsonl

from service.config import Settings
from service.stack import Stack, free_port, stack_env
from workers.rollout.vllm import vllm_installed

pytestmark = pytest.mark.slow

STANDARD_METRICS = ["reward/mean", "reward/std", "loss", "kl/ref", "logratio/mean", "entropy",
                    "response_length/mean", "grad_norm", "lr", "time/rollout_s", "time/reward_s",
                    "time/learn_s", "throughput/tokens_per_s"]


def cli(settings: Settings, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "service.cli", *args], env=stack_env(settings),
                         capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip()


def make_settings(root: Path, **kw) -> Settings:
    return Settings(data_dir=root, api_port=free_port(), grpc_port=free_port(), heartbeat_seconds=1.0,
                    **kw)


@pytest.fixture(scope="module", params=BACKENDS)
def embedded(request, tmp_path_factory):
    """The stack, once per back end (PostgreSQL + Redis: a database of the session's cluster)."""
    settings = make_settings(tmp_path_factory.mktemp("stack"),
                             **backend_settings(request, request.param))
    cli(settings, "db", "upgrade")
    stack = Stack(settings, log_dir=settings.resolved_data_dir / "logs").start()
    yield stack
    stack.stop()


def spec(model_dir, train_file: str, **training) -> dict:
    return {
        "model": {"path": str(model_dir)},
        "dataset": {"train_file": train_file},
        "reward": {"type": "builtin", "name": "char_accuracy"},
        "algorithm": {"group_size": 4, "reference": "initial", "beta": 0.05},
        "sampling": {"max_new_tokens": 5},
        "optimizer": {"lr": 1e-3},
        "training": {"steps": 8, "prompts_per_step": 4, "mini_batches": 2, **training},
        "checkpoint": {"every_steps": 4},
    }


def project_with_file(settings: Settings, url: str, project: str, tmp_path: Path):
    """A new project's HTTP client and the id of a 16-row training file it uploaded."""
    key = cli(settings, "api-key", "create", "--project", project)
    http = httpx.Client(base_url=url, headers=auth(key), timeout=60)
    data = write_jsonl(tmp_path / "train.jsonl", copy_rows(16))
    with data.open("rb") as fh:
        file_id = http.post("/v1/files", files={"file": ("t.jsonl", fh)}).json()["id"]
    return http, file_id


def wait_for(http: httpx.Client, run_id: str, statuses: set[str], timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        run = http.get(f"/v1/runs/{run_id}").json()
        if run["status"] in statuses:
            return run
        assert time.monotonic() < deadline, f"run stuck in {run['status']}"
        time.sleep(0.3)


def test_train_through_the_http_api(embedded, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = cli(embedded.settings, "api-key", "create", "--project", "acceptance")
    http = httpx.Client(base_url=embedded.url, headers=auth(key), timeout=30)
    data = write_jsonl(tmp_path / "train.jsonl", copy_rows(40))
    with data.open("rb") as fh:
        upload = http.post("/v1/files", files={"file": ("train.jsonl", fh)}, data={"purpose": "train"})
    assert upload.status_code == 201 and upload.json()["rows"] == 40

    created = http.post("/v1/runs", json=spec(tiny_model_dir, upload.json()["id"]))
    assert created.status_code == 201, created.text
    run = wait_for(http, created.json()["id"], {"succeeded", "failed", "cancelled"})
    assert run["status"] == "succeeded", run["error"]
    assert run["step"] == run["total_steps"] == 8

    metrics = http.get(f"/v1/runs/{run['id']}/metrics").json()["metrics"]
    for name in STANDARD_METRICS:
        assert [s for s, _ in metrics[name]] == list(range(1, 9)), name
    # engine "auto" in a real worker process: vLLM, with its log-probs in step with the learner
    events = http.get(f"/v1/runs/{run['id']}/events").json()["data"]
    loaded = next(e for e in events if e["type"] == "run.model_loaded")
    assert loaded["data"]["rollout_engine"] == ("vllm" if vllm_installed() else "hf")
    if vllm_installed():
        assert max(v for _, v in metrics["rollout/logprob_diff_max"]) < 1e-4
    samples = http.get(f"/v1/runs/{run['id']}/samples", params={"step": 8}).json()
    assert len(samples["data"]) == 16 and {s["group_index"] for s in samples["data"]} == {0, 1, 2, 3}

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
    _rescore_and_go_on(http, run, ckpts[-1]["id"], upload.json()["id"])


def _rescore_and_go_on(http: httpx.Client, run: dict, ckpt_id: str, train_file: str) -> None:
    """The worker re-scores the run; a new run starts from its checkpoint and trains on the
    re-scored groups, and on a group posted to it, with no rollouts."""
    rescore = http.post(f"/v1/runs/{run['id']}/rescore",
                        json={"reward": {"type": "builtin", "name": "exact_match"}})
    assert rescore.status_code == 202, rescore.text
    url, deadline = f"/v1/runs/{run['id']}/rescores/{rescore.json()['id']}", time.monotonic() + 120
    while (done := http.get(url).json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, "rescore stuck"
        time.sleep(0.3)
    assert (done["status"], done["samples_scored"]) == ("succeeded", 8 * 4 * 4), done
    body = spec(run["spec"]["model"]["path"], train_file, steps=2, offpolicy_fraction=1.0)
    body["model"], body["rollout"] = {"checkpoint": ckpt_id}, {"engine": "hf"}
    body["dataset"]["offpolicy_file"] = done["file_id"]
    created = http.post("/v1/runs", json=body)
    assert created.status_code == 201, created.text
    posted = {"prompt": "abc=", "answer": "abc", "completions": ["abc", "ab", "b", "abcd"],
              "source": "teacher"}
    assert http.post(f"/v1/runs/{created.json()['id']}/groups",
                     json={"groups": [posted]}).status_code == 202
    second = wait_for(http, created.json()["id"], {"succeeded", "failed", "cancelled"})
    assert second["status"] == "succeeded", second["error"]
    assert second["tokens_generated"] == 0
    sources = {s["source"] for step in (1, 2) for s in http.get(
        f"/v1/runs/{second['id']}/samples", params={"step": step}).json()["data"]}
    assert sources == {"teacher", run["id"]}


def test_grpc_and_the_cli_follow_a_run_live(embedded, tiny_model_dir, tmp_path):
    """The API process serves gRPC beside REST: a run created over gRPC is watched to its end
    over gRPC while `gvpo runs watch` follows the same run over SSE."""
    import grpc
    from google.protobuf.struct_pb2 import Struct

    from gvpo.v1 import runs_pb2, runs_pb2_grpc

    http, file_id = project_with_file(embedded.settings, embedded.url, "watchers", tmp_path)
    key = http.headers["Authorization"].removeprefix("Bearer ")
    body = Struct()
    body.update(spec(tiny_model_dir, file_id))
    with grpc.insecure_channel(f"127.0.0.1:{embedded.settings.grpc_port}") as channel:
        runs = runs_pb2_grpc.RunsStub(channel)
        metadata = (("authorization", f"Bearer {key}"),)
        run = runs.CreateRun(runs_pb2.CreateRunRequest(spec=body), metadata=metadata).run
        watch = subprocess.Popen([sys.executable, "-m", "service.cli", "runs", "watch", run.id],
                                 env={**stack_env(embedded.settings), "GVPO_API_KEY": key,
                                      "COLUMNS": "160"},
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        updates = list(runs.WatchRun(runs_pb2.WatchRunRequest(run_id=run.id), metadata=metadata,
                                     timeout=180))
    shown, _ = watch.communicate(timeout=60)
    assert watch.returncode == 0, shown
    assert "run.started" in shown and "run.succeeded" in shown and "8/8" in shown, shown
    assert "reward " in shown and "loss " in shown, shown

    assert [u.run for u in updates if u.HasField("run")][-1].status == "succeeded"
    streamed = {u.metrics.step: u.metrics.values["reward/mean"]
                for u in updates if u.HasField("metrics")}
    stored = http.get(f"/v1/runs/{run.id}/metrics", params={"names": "reward/mean"}).json()
    assert streamed == {step: value for step, value in stored["metrics"]["reward/mean"]}
    assert [u.event.type for u in updates if u.HasField("event")][-1] == "run.succeeded"


def test_grpo_and_lora_runs_through_the_same_api(embedded, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    http, file_id = project_with_file(embedded.settings, embedded.url, "variants", tmp_path)
    grpo = {**spec(tiny_model_dir, file_id, steps=3), "algorithm": {"name": "grpo", "group_size": 4}}
    lora = spec(tiny_model_dir, file_id, steps=4)
    lora["model"]["lora"] = {"r": 4, "alpha": 8}
    runs = [http.post("/v1/runs", json=body).json() for body in (grpo, lora)]
    for run in runs:
        done = wait_for(http, run["id"], {"succeeded", "failed"})
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


def test_a_run_on_two_processes_through_the_worker(embedded, tiny_model_dir, tmp_path):
    """The Celery pool child (daemonic: no multiprocessing children) starts torchrun; each rank
    rolls out with its own engine (`auto`: vLLM where installed) and rank 0 records."""
    http, file_id = project_with_file(embedded.settings, embedded.url, "two-procs", tmp_path)
    body = {**spec(tiny_model_dir, file_id, steps=4),
            "resources": {"processes": 2, "strategy": "fsdp"}}
    run = wait_for(http, http.post("/v1/runs", json=body).json()["id"],
                   {"succeeded", "failed", "cancelled"})
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


def test_missing_model_fails_with_event_and_cancel_stops_a_run(embedded, tmp_path):
    http, file_id = project_with_file(embedded.settings, embedded.url, "faults", tmp_path)

    missing = spec(tmp_path / "missing-model", file_id)
    if embedded.settings.embedded:  # the API sees what the worker would: refused at submission
        error = http.post("/v1/runs", json=missing)
        assert error.status_code == 422, error.text
        assert [f["field"] for f in error.json()["error"]["details"]["fields"]] == ["model.path"]
        assert "no such directory" in error.json()["error"]["message"]
        return
    bad = http.post("/v1/runs", json=missing).json()  # a cluster's API leaves it to the worker
    failed = wait_for(http, bad["id"], {"succeeded", "failed"})
    assert failed["status"] == "failed" and "does not exist" in failed["error"]
    events = http.get(f"/v1/runs/{bad['id']}/events").json()["data"]
    assert events[-1]["type"] == "run.failed" and "missing-model" in events[-1]["message"]


def test_cancel_a_running_run(embedded, tiny_model_dir, tmp_path):
    http, file_id = project_with_file(embedded.settings, embedded.url, "cancel", tmp_path)
    long = http.post("/v1/runs", json=spec(tiny_model_dir, file_id, steps=100000)).json()
    deadline = time.monotonic() + 120
    while http.get(f"/v1/runs/{long['id']}").json()["step"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    # Prometheus, scraped from the API while the worker trains
    from prometheus_client.parser import text_string_to_metric_families

    scraped = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(httpx.get(f"{embedded.url}/metrics").text)
               for s in f.samples}
    assert scraped[("gvpo_runs", (("state", "running"),))] >= 1
    ages = [v for (name, labels), v in scraped.items()
            if name == "gvpo_worker_heartbeat_age_seconds" and ("run_id", long["id"]) in labels]
    assert len(ages) == 1 and 0 <= ages[0] < embedded.settings.lease_seconds
    learn = scraped[("gvpo_step_phase_seconds", (("phase", "learn"), ("run_id", long["id"])))]
    assert 0 < learn < 60
    assert http.post(f"/v1/runs/{long['id']}/cancel").status_code == 200
    run = wait_for(http, long["id"], {"cancelled", "failed", "succeeded"}, timeout=60)
    assert run["status"] == "cancelled" and 2 <= run["step"] < 100000


def _process_tree(root: int) -> set[int]:
    """`root` and every live process below it. (Found by parent pid: the environment cannot
    mark them, since Celery's setproctitle reuses the memory /proc/PID/environ reads from.)"""
    parents = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit():
                # after the parenthesised command name: state, then the parent's pid
                state, ppid = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:2]
                if state != "Z":  # a zombie has exited; it only waits to be reaped
                    parents[int(proc.name)] = int(ppid)
        except (OSError, ValueError):
            continue
    tree, grew = {root} & parents.keys(), True
    while grew:
        below = {pid for pid, ppid in parents.items() if ppid in tree} - tree
        tree |= below
        grew = bool(below)
    return tree


def test_gvpo_up_stops_cleanly_on_ctrl_c(tmp_path):
    settings = make_settings(tmp_path / "up-stack")
    env = stack_env(settings)
    up = subprocess.Popen([sys.executable, "-m", "service.cli", "up"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{settings.api_port}/readyz"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert up.poll() is None and time.monotonic() < deadline, up.stdout.read()
        time.sleep(0.2)
    stack = _process_tree(up.pid)
    assert len(stack) >= 4  # gvpo up, the API, the worker and its pool child
    up.send_signal(signal.SIGINT)
    assert up.wait(timeout=30) == 0
    time.sleep(0.5)
    assert stack & _process_tree(1) == set()  # none of them is left anywhere
    with pytest.raises(httpx.HTTPError):
        httpx.get(url, timeout=1)


def test_cli_client_commands(embedded, tiny_model_dir, tmp_path):
    import json

    import yaml

    settings = embedded.settings
    key = cli(settings, "api-key", "create", "--project", "cli")
    client = settings.model_copy(update={"api_key": key})
    env_cli = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "service.cli", *a], capture_output=True, text=True, timeout=300,
        env={**stack_env(client), "GVPO_API_KEY": key, "GVPO_API_URL": embedded.url})
    data = write_jsonl(tmp_path / "train.jsonl", copy_rows(16))
    uploaded = env_cli("files", "upload", str(data))
    assert uploaded.returncode == 0, uploaded.stderr
    file_id = json.loads(uploaded.stdout)["id"]
    spec_path = tmp_path / "run.yaml"
    spec_path.write_text(yaml.safe_dump(spec(tiny_model_dir, file_id, steps=3)))
    submitted = env_cli("submit", str(spec_path), "--wait")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    run_id = json.JSONDecoder().raw_decode(submitted.stdout)[0]["id"]  # progress follows the JSON
    listed = env_cli("runs", "list")
    assert run_id in listed.stdout and "succeeded" in listed.stdout
    bad = env_cli("runs", "show", "run_does_not_exist")
    assert bad.returncode == 2 and "404 not_found" in bad.stderr
    # pause/resume from the CLI: a finished run can be neither (409), named on stderr
    paused = env_cli("runs", "pause", run_id)
    assert paused.returncode == 2 and "409 conflict" in paused.stderr
    resumed = env_cli("runs", "resume", run_id)
    assert resumed.returncode == 2 and "only a paused run" in resumed.stderr
    # re-score the finished run by the worker, then post its groups to a new run that has
    # off-policy slots (queued: the groups wait for its steps)
    reward = tmp_path / "reward.yaml"
    reward.write_text("type: builtin\nname: exact_match\n")
    rescored = env_cli("runs", "rescore", run_id, str(reward), "--wait")
    assert rescored.returncode == 0, rescored.stdout + rescored.stderr
    result = json.loads(rescored.stdout)
    assert (result["status"], result["samples_scored"]) == ("succeeded", 3 * 4 * 4)
    groups = tmp_path / "groups.jsonl"
    assert env_cli("files", "download", result["file_id"], str(groups)).returncode == 0
    assert len(groups.read_text().splitlines()) == 3 * 4
    spec_path.write_text(yaml.safe_dump(spec(tiny_model_dir, file_id, steps=3,
                                             offpolicy_fraction=0.5)))
    paused_run = json.loads(env_cli("submit", str(spec_path)).stdout)["id"]
    env_cli("runs", "pause", paused_run)
    added = env_cli("runs", "add-groups", paused_run, str(groups))
    assert added.returncode == 0, added.stderr
    assert f"posted {3 * 4}/{3 * 4} groups; {3 * 4} wait" in added.stdout
