"""The `gvpo` client commands through the real command (`python -m service.cli` in a
subprocess), against one embedded stack: a run trained by its worker to the end, with two
checkpoints, read back by every command, for people (tables, lines) and for scripts (-q,
--json, CSV); and each command's failures (a wrong or revoked key, no API, a run that is not
there) as one or two lines and an exit code, never a traceback."""

import csv
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import yaml

from service.cli.boundary import BROKEN_PIPE, CliError
from service.cli.results import _unpack
from service.stack import stack_env

from factories import (
    STANDARD_METRICS,
    TOOL_RUN,
    auth,
    copy_rows,
    record_episode_steps,
    run_spec,
    write_jsonl,
)
from services import cli, cli_refusal, closed_port, stack_settings, start_stack

pytestmark = pytest.mark.slow

CLI_S = 120  # one command, on a loaded machine (a --wait one: the whole run)
STEPS = 4
CLOCK = re.compile(r"^\d\d:\d\d:\d\d ")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    settings = stack_settings(tmp_path_factory.mktemp("stack"))
    cli(settings, "db", "upgrade")
    stack = start_stack(settings, settings.resolved_data_dir / "logs")
    yield stack
    stack.stop()


def gvpo_as(stack, key: str | None, *args: str, cwd=None, **env: str):
    """`gvpo ARGS` as a user's shell runs it, against the stack's API with `key`."""
    base = {k: v for k, v in stack_env(stack.settings).items() if k != "GVPO_DEBUG"}
    base.pop("GVPO_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env={**base, "GVPO_API_URL": stack.url, **({"GVPO_API_KEY": key} if key else {}), **env},
        capture_output=True,
        text=True,
        timeout=CLI_S,
        cwd=cwd,
    )


def ok(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def refused(out: subprocess.CompletedProcess, code: int = 1) -> str:
    """The standard error of a command that failed as a user should see it."""
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr + out.stdout, out.stderr
    assert 1 <= len(out.stderr.strip().splitlines()) <= 2, out.stderr
    return out.stderr


@pytest.fixture(scope="module")
def user(stack, tiny_model_dir, tmp_path_factory):
    """A project's `gvpo` (gvpo(*args)), the training file it uploaded with `files upload -q`
    and a run of STEPS steps, a checkpoint every 2, that `submit -q --wait` trained."""
    tmp = tmp_path_factory.mktemp("cli")
    key = cli(stack.settings, "api-key", "create", "--project", "cli")

    def gvpo(*args: str, **kw) -> subprocess.CompletedProcess:
        return gvpo_as(stack, key, *args, **kw)

    file_id = ok(gvpo("files", "upload", str(write_jsonl(tmp / "copy3.jsonl", copy_rows(8))), "-q"))
    file_id = file_id.strip()
    spec = run_spec(
        tiny_model_dir,
        file_id,
        name="cli-run",
        algorithm={"reference": "initial"},
        rollout={"engine": "hf"},
        training={"steps": STEPS, "prompts_per_step": 2, "mini_batches": 1},
        checkpoint={"every_steps": 2},
    )
    (tmp / "run.yaml").write_text(yaml.safe_dump(spec))
    submitted = gvpo("submit", str(tmp / "run.yaml"), "-q", "--wait")
    run_id = ok(submitted).strip()  # the id alone: the progress went to standard error
    assert re.fullmatch(r"run_\w+", run_id), submitted.stdout
    assert "run.succeeded" in submitted.stderr
    return SimpleNamespace(gvpo=gvpo, key=key, file_id=file_id, run_id=run_id, tmp=tmp)


# ---------------------------------------------------------------- files and submitting


def test_files_upload_says_what_it_stored_and_files_list_shows_it(user):
    path = write_jsonl(user.tmp / "more.jsonl", copy_rows(3))
    said = ok(user.gvpo("files", "upload", str(path), "--purpose", "eval")).strip()
    assert re.fullmatch(r"uploaded more\.jsonl as file_\w+ \(3 rows, purpose eval\)", said)
    listed = ok(user.gvpo("files", "list")).splitlines()
    assert listed[0].split() == ["ID", "FILENAME", "PURPOSE", "ROWS", "SIZE", "CREATED"]
    assert any(line.startswith(user.file_id) and "copy3.jsonl" in line for line in listed)
    files = json.loads(ok(user.gvpo("files", "list", "--json")))
    assert {f["id"]: f["rows"] for f in files}[user.file_id] == 8


def test_a_run_paused_while_watched_is_named_with_how_to_resume_it(user):
    """Submitted for people (its id, and how to watch it), paused, then watched: watching
    stops there, exit 0, with the command that continues it."""
    submitted = user.gvpo("submit", str(user.tmp / "run.yaml"))
    said = ok(submitted).strip()
    match = re.fullmatch(r"submitted (run_\w+) \(cli-run\): queued", said)
    assert match, said
    run_id = match[1]
    assert f"watch it: gvpo runs watch {run_id}" in submitted.stderr
    assert ok(user.gvpo("runs", "pause", run_id)).startswith(f"{run_id}: ")
    watched = user.gvpo("runs", "watch", run_id)
    assert watched.returncode == 0 and "Traceback" not in watched.stderr, watched.stderr
    step = json.loads(ok(user.gvpo("runs", "show", run_id, "--json")))["step"]
    assert (
        f"{run_id} is paused at step {step}; `gvpo runs resume {run_id}` continues it"
        in watched.stderr
    )
    ok(user.gvpo("runs", "cancel", run_id))


# ---------------------------------------------------------------- what a run recorded


def test_runs_list_and_show_give_status_step_and_reward(user):
    run = json.loads(ok(user.gvpo("runs", "show", user.run_id, "--json")))
    assert run["status"] == "succeeded" and isinstance(run["reward"], float)
    rows = ok(user.gvpo("runs", "list", "--status", "succeeded")).splitlines()
    assert rows[0].split() == ["ID", "NAME", "STATUS", "STEP", "REWARD", "AGE"]
    row = next(r for r in rows if r.startswith(user.run_id)).split()
    assert row[1:5] == ["cli-run", "succeeded", f"{STEPS}/{STEPS}", f"{run['reward']:.4g}"]
    assert row[-1] == "ago" and re.fullmatch(r"\d+[smhd]", row[-2])
    assert user.run_id in [r["id"] for r in json.loads(ok(user.gvpo("runs", "list", "--json")))]
    shown = dict(
        line.split(":", 1) for line in ok(user.gvpo("runs", "show", user.run_id)).splitlines()
    )
    assert shown["status"].strip() == "succeeded" and shown["step"].strip() == f"{STEPS}/{STEPS}"
    assert shown["checkpoints"].strip() == "2"


def test_usage_estimate_and_quota_commands(stack, user):
    run = json.loads(ok(user.gvpo("runs", "show", user.run_id, "--json")))
    by_run = json.loads(ok(user.gvpo("usage", "--by", "run", "--json")))
    (row,) = [r for r in by_run["data"] if r["run_id"] == user.run_id]
    assert row["tokens_generated"] == run["tokens_generated"] > 0 and row["cpu_seconds"] > 0
    table = ok(user.gvpo("usage")).splitlines()
    assert table[0].split()[:3] == ["DAY", "GPU-S", "CPU-S"] and len(table) == 2
    estimate = ok(user.gvpo("estimate", str(user.tmp / "run.yaml")))
    assert "device-hours:" in estimate and "unknown" not in estimate  # the run above is its basis

    # the operator's side: a quota of its own, shown, and back to the default
    said = cli(stack.settings, "quota", "set", "--project", "cli", "--max-concurrent-runs", "2")
    assert said == "quota of cli: max_concurrent_runs=2"
    shown = json.loads(cli(stack.settings, "quota", "show", "--project", "cli", "--json"))
    assert shown[0]["max_concurrent_runs"] == 2 and shown[0]["own"] == ["max_concurrent_runs"]
    assert shown[0]["gpu_hours_used"] == pytest.approx(by_run["quota"]["gpu_hours_used"])
    assert "no project named 'nope'" in cli_refusal(
        stack.settings, "quota", "set", "--project", "nope", "--gpu-hours", "1"
    )
    assert "neither a number nor 'none'" in cli_refusal(
        stack.settings, "quota", "set", "--project", "cli", "--max-gpus", "many"
    )
    cli(stack.settings, "quota", "set", "--project", "cli", "--max-concurrent-runs", "none")
    assert (
        json.loads(cli(stack.settings, "quota", "show", "--json", "--project", "cli"))[0]["own"]
        == []
    )


def test_runs_logs_shows_the_events_at_their_own_times(user):
    events = [
        json.loads(line)
        for line in ok(user.gvpo("runs", "logs", user.run_id, "--json")).splitlines()
    ]
    assert events[-1]["type"] == "run.succeeded"
    lines = ok(user.gvpo("runs", "logs", user.run_id, "-f")).splitlines()  # ended: returns
    assert len(lines) == len(events)
    for line, event in zip(lines, events, strict=True):
        at = datetime.fromisoformat(event["created_at"]).replace(tzinfo=UTC).astimezone()
        assert line.startswith(at.strftime("%Y-%m-%d %H:%M:%S")), line
        assert line.split()[2:4] == [event["level"], event["type"]]


def test_runs_watch_replays_the_events_with_their_times_in_a_narrow_terminal(user):
    out = user.gvpo("runs", "watch", user.run_id, COLUMNS="40")
    shown = ok(out).splitlines()
    assert all(len(line) <= 40 for line in shown), shown
    events = [
        json.loads(line)
        for line in ok(user.gvpo("runs", "logs", user.run_id, "--json")).splitlines()
    ]
    stamps = [line[:8] for line in shown if CLOCK.match(line)]
    assert stamps == [
        datetime.fromisoformat(e["created_at"])
        .replace(tzinfo=UTC)
        .astimezone()
        .strftime("%H:%M:%S")
        for e in events
    ]
    assert shown[-1].startswith(f"succeeded {STEPS}/{STEPS} reward ")


def test_runs_metrics_as_a_table_and_as_csv(user):
    table = ok(user.gvpo("runs", "metrics", user.run_id)).splitlines()
    assert table[0].split()[:4] == ["STEP", "reward/mean", "reward/std", "loss"]
    assert [row.split()[0] for row in table[1:]] == [str(s) for s in range(1, STEPS + 1)]
    chosen = list(
        csv.reader(
            io.StringIO(
                ok(user.gvpo("runs", "metrics", user.run_id, "--csv", "--names", "loss,kl/ref"))
            )
        )
    )
    assert chosen[0] == ["step", "loss", "kl/ref"] and len(chosen) == STEPS + 1
    every = next(csv.reader(io.StringIO(ok(user.gvpo("runs", "metrics", user.run_id, "--csv")))))
    assert every[0] == "step" and set(STANDARD_METRICS) <= set(every)
    missing = user.gvpo("runs", "metrics", user.run_id, "--names", "nope")
    assert "has recorded no metric nope" in missing.stderr and missing.returncode == 0


def test_runs_samples_shows_each_group_with_its_rewards(user):
    answer = json.loads(ok(user.gvpo("runs", "samples", user.run_id, "--json")))
    assert answer["step"] == STEPS and answer["data"]
    shown = ok(user.gvpo("runs", "samples", user.run_id, "--step", "1")).splitlines()
    assert re.fullmatch(r"step 1: \d+ samples, mean reward [\d.e-]+", shown[0])
    assert "group 0" in shown and any(line.startswith("  prompt: ") for line in shown)


def test_checkpoints_list_and_download_into_a_loadable_folder(user, tmp_path):
    from transformers import AutoModelForCausalLM

    listed = ok(user.gvpo("checkpoints", "list", user.run_id)).splitlines()
    assert listed[0].split() == ["ID", "STEP", "KIND", "SIZE", "CREATED"]
    checkpoints = json.loads(ok(user.gvpo("checkpoints", "list", user.run_id, "--json")))
    assert [c["step"] for c in checkpoints] == [2, STEPS]
    latest = checkpoints[-1]["id"]
    folder = Path(ok(user.gvpo("checkpoints", "download", user.run_id, cwd=tmp_path)).strip())
    assert folder == tmp_path / latest
    assert (folder / "config.json").is_file() and list(folder.glob("*.safetensors"))
    AutoModelForCausalLM.from_pretrained(folder)
    again = refused(user.gvpo("checkpoints", "download", user.run_id, latest, "--dir", str(folder)))
    assert f"{folder} is not empty" in again


def test_an_archive_member_out_of_its_folder_is_refused(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        payload = b"x"
        member = tarfile.TarInfo("ckpt_x/../../escaped")
        member.size = len(payload)
        tar.addfile(member, io.BytesIO(payload))
    with pytest.raises(CliError, match="refused the archive"):
        _unpack(archive, tmp_path / "scratch", "ckpt_x", tmp_path / "out")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- API keys (admin)


def test_a_revoked_key_is_refused_through_the_cli(stack, user):
    key = cli(stack.settings, "api-key", "create", "--project", "revoker")
    listed = cli(stack.settings, "api-key", "list", "--project", "revoker").splitlines()
    assert listed[0].split() == ["ID", "PROJECT", "PREFIX", "CREATED", "REVOKED"]
    (row,) = listed[1:]
    key_id, project, prefix = row.split()[:3]
    assert project == "revoker" and prefix == key[:16] + "…" and row.endswith("-")
    assert cli(stack.settings, "api-key", "revoke", key_id) == f"revoked {key_id}"
    keys = json.loads(cli(stack.settings, "api-key", "list", "--json"))
    assert next(k for k in keys if k["id"] == key_id)["revoked_at"]
    said = refused(gvpo_as(stack, key, "runs", "list"))
    assert "the API key was refused (401 unauthorized" in said and "GVPO_API_KEY" in said
    unknown = refused(gvpo_as(stack, None, "api-key", "revoke", "key_nope"))
    assert "no API key 'key_nope'" in unknown


# ---------------------------------------------------------------- failures


READERS = [
    ["files", "list"],
    ["runs", "logs", "RUN"],
    ["runs", "metrics", "RUN"],
    ["runs", "samples", "RUN"],
    ["checkpoints", "list", "RUN"],
    ["checkpoints", "download", "RUN"],
]


@pytest.mark.parametrize("command", READERS, ids=lambda c: " ".join(c[:2]))
def test_each_command_names_a_missing_api_and_a_missing_run(user, command):
    """(A wrong key: test_a_revoked_key_is_refused_through_the_cli, and test_cli_errors.)"""
    args = [user.run_id if a == "RUN" else a for a in command]
    with closed_port() as port:
        said = refused(user.gvpo(*args, GVPO_API_URL=f"http://127.0.0.1:{port}"))
    assert f"cannot reach the API at http://127.0.0.1:{port}: is `gvpo up` running?" in said
    if "RUN" in command:
        said = refused(user.gvpo(*[a.replace(user.run_id, "run_nope") for a in args]))
        assert "no run 'run_nope' in this project (404 not_found)" in said


def test_a_reader_that_leaves_ends_the_command_quietly(stack, user):
    """`gvpo runs list | head -1`: the pipe closes before the command writes."""
    env = {**stack_env(stack.settings), "GVPO_API_URL": stack.url, "GVPO_API_KEY": user.key}
    listing = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "runs", "list"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    listing.stdout.close()
    _, said = listing.communicate(timeout=CLI_S)
    assert listing.returncode == BROKEN_PIPE and said == b"", said


def completion(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service.cli"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=CLI_S,
    )


def test_shell_completion_scripts_are_printed():
    script = completion(_GVPO_COMPLETE="bash_source")
    assert script.returncode == 0 and "_gvpo_completion()" in script.stdout, script.stderr
    words = completion(_GVPO_COMPLETE="bash_complete", COMP_WORDS="gvpo runs l", COMP_CWORD="2")
    assert words.stdout.split() == ["plain,list", "plain,logs"]


def test_runs_samples_shows_an_episode_turn_by_turn(stack, user, tiny_model_dir):
    http = httpx.Client(base_url=stack.url, headers=auth(user.key), timeout=30)
    spec = run_spec(tiny_model_dir, user.file_id, **TOOL_RUN)
    created = http.post("/v1/runs", json=spec)
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]
    record_episode_steps(stack.settings, run_id, steps=1)
    shown = ok(user.gvpo("runs", "samples", run_id)).splitlines()
    assert "    1.0000  episode (done, 29 of 40 tokens trained)" in shown
    assert any(line.strip().startswith("* assistant: [call python(") for line in shown)
    assert any(line.strip() == "tool: 42" for line in shown)  # not trained: no *
