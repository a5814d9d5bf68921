"""The API client's commands (GVPO_API_URL, GVPO_API_KEY): files, runs, and following a run."""

import sys
import time
from pathlib import Path

import click

from service.cli.boundary import INTERRUPTED, CliError
from service.cli.documents import read_document, read_jsonl
from service.cli.output import (
    age,
    answer,
    cell,
    json_option,
    listing,
    local_time,
    paused,
    print_json,
    quiet_option,
    size,
)
from service.config import get_settings
from service.contract.files import FilePurpose
from service.contract.states import RESCORE_ACTIVE, RescoreStatus, RunStatus

GROUPS_PER_REQUEST = 1000  # the API's limit for one POST .../groups


def connect():
    from gvpo_client import Client

    settings = get_settings()
    if not settings.api_key:
        raise CliError(
            "set GVPO_API_KEY to your project's API key (`gvpo api-key create --project NAME` "
            "makes one, on the API's machine)"
        )
    return Client(settings.resolved_api_url, settings.api_key)


def _follow(client, run_id: str, stderr: bool = False) -> int:
    """Show the run until it ends or is paused (on standard error when `stderr`: after a
    command's answer); its exit code (0: it succeeded, or it is paused). Ctrl-C stops watching,
    not the run."""
    from rich.console import Console

    from service.progress import follow_run

    try:
        run = follow_run(client, run_id, Console(log_path=False, stderr=stderr))
    except KeyboardInterrupt:
        raise CliError(
            f"stopped watching; the run goes on: re-attach with `gvpo runs watch {run_id}`",
            INTERRUPTED,
        ) from None
    if run["status"] == RunStatus.PAUSED:
        click.echo(paused(run), err=True)
        return 0
    return 0 if run["status"] == RunStatus.SUCCEEDED else 1


@click.group("files")
def files_group() -> None:
    """Dataset files."""


@files_group.command("upload")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--purpose", default="train", type=click.Choice([p.value for p in FilePurpose]))
@quiet_option
@json_option
def files_upload(path: str, purpose: str, quiet: bool, as_json: bool) -> None:
    """Upload a JSONL dataset; prints its id (`dataset.train_file` of a run spec)."""
    with connect() as client:
        uploaded = client.upload_file(path, purpose)
    said = (
        f"uploaded {uploaded['filename']} as {uploaded['id']} "
        f"({uploaded['rows']} rows, purpose {uploaded['purpose']})"
    )
    answer(uploaded, as_json, quiet, said)


@files_group.command("list")
@json_option
def files_list(as_json: bool) -> None:
    """The project's files."""
    with connect() as client:
        files = client.list_files()
    listing(
        files,
        as_json,
        ["ID", "FILENAME", "PURPOSE", "ROWS", "SIZE", "CREATED"],
        lambda f: [
            f["id"],
            f["filename"],
            f["purpose"],
            f["rows"],
            size(f["bytes"]),
            age(f["created_at"]),
        ],
        "no files yet: `gvpo files upload PATH` adds one",
    )


@files_group.command("download")
@click.argument("file_id")
@click.argument("dest", type=click.Path(dir_okay=False, path_type=Path))
def files_download(file_id: str, dest: Path) -> None:
    """Write a file's JSONL to DEST (a rescore's groups, say)."""
    with connect() as client:
        dest.write_bytes(client.file_content(file_id))
    click.echo(str(dest))


@click.command()
@click.argument("spec_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--idempotency-key", default=None)
@click.option("--wait", is_flag=True, help="follow the run until it finishes")
@quiet_option
@json_option
def submit(
    spec_path: str, idempotency_key: str | None, wait: bool, quiet: bool, as_json: bool
) -> None:
    """Submit a run spec (YAML or JSON); prints the run's id (with --json, the run, and its
    webhook secret, shown this once)."""
    spec = read_document(spec_path)
    with connect() as client:
        run = client.create_run(spec, idempotency_key)
        named = f" ({run['name']})" if run["name"] else ""
        answer(run, as_json, quiet, f"submitted {run['id']}{named}: {run['status']}")
        if not (wait or as_json or quiet):
            click.echo(f"watch it: gvpo runs watch {run['id']}", err=True)
        if wait:
            sys.exit(_follow(client, run["id"], stderr=True))


@click.group("runs")
def runs_group() -> None:
    """Inspect and control runs."""


@runs_group.command("list")
@click.option("--status", default=None, type=click.Choice([s.value for s in RunStatus]))
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True)
@json_option
def runs_list(status: str | None, limit: int, as_json: bool) -> None:
    """The project's runs, newest first."""
    with connect() as client:
        runs = client.list_runs(status=status, limit=limit)["data"]
    listing(
        runs,
        as_json,
        ["ID", "NAME", "STATUS", "STEP", "REWARD", "AGE"],
        lambda r: [
            r["id"],
            r["name"],
            r["status"],
            f"{r['step']}/{r['total_steps']}",
            r.get("reward"),
            age(r["created_at"]),
        ],
        "no runs" + (f" {status}" if status else "") + ": `gvpo submit SPEC` starts one",
    )


@runs_group.command("show")
@click.argument("run_id")
@json_option
def runs_show(run_id: str, as_json: bool) -> None:
    """A run's state: status, step, reward, times, error and checkpoints."""
    with connect() as client:
        run = client.get_run(run_id)
        if as_json:
            print_json(run)
            return
        checkpoints = client.checkpoints(run_id)
    lines = [
        ("run", f"{run['id']}" + (f" ({run['name']})" if run["name"] else "")),
        ("status", run["status"] + (" (cancel requested)" if run["cancel_requested"] else "")),
        ("step", f"{run['step']}/{run['total_steps']}"),
        (
            "reward",
            cell(run.get("reward"))
            + ("  (the last step's mean)" if run.get("reward") is not None else ""),
        ),
        ("samples", f"{run['samples_generated']} ({run['tokens_generated']} tokens)"),
        ("created", f"{local_time(run['created_at'])} ({age(run['created_at'])})"),
        ("started", local_time(run["started_at"])),
        ("finished", local_time(run["finished_at"])),
        ("checkpoints", str(len(checkpoints))),
    ]
    if run["error"]:
        lines.append(("error", run["error"]))
    if run.get("waiting_reason"):
        lines.append(("waiting", run["waiting_reason"]))
    for label, value in lines:
        click.echo(f"{label + ':':<13}{value}")


@runs_group.command("watch")
@click.argument("run_id")
def runs_watch(run_id: str) -> None:
    """Follow a run live: progress, latest metrics and events, until it ends (exit 0 if it
    succeeded). Ctrl-C stops watching; the run goes on."""
    with connect() as client:
        sys.exit(_follow(client, run_id))


def _control(action: str, run_id: str, as_json: bool) -> None:
    with connect() as client:
        run = getattr(client, f"{action}_run")(run_id)
    if as_json:
        print_json(run)
        return
    requested = run["cancel_requested"] if action == "cancel" else False
    click.echo(
        f"{run['id']}: {run['status']} at step {run['step']}/{run['total_steps']}"
        + (" (cancel requested: its worker stops after this step)" if requested else "")
    )


@runs_group.command("cancel")
@click.argument("run_id")
@json_option
def runs_cancel(run_id: str, as_json: bool) -> None:
    """Stop a run for good (a running one after its current step)."""
    _control("cancel", run_id, as_json)


@runs_group.command("pause")
@click.argument("run_id")
@json_option
def runs_pause(run_id: str, as_json: bool) -> None:
    """Checkpoint after the current step and free the worker; `resume` continues."""
    _control("pause", run_id, as_json)


@runs_group.command("resume")
@click.argument("run_id")
@json_option
def runs_resume(run_id: str, as_json: bool) -> None:
    """Queue a paused run again: it continues from its last checkpoint."""
    _control("resume", run_id, as_json)


@runs_group.command("add-groups")
@click.argument("run_id")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
def runs_add_groups(run_id: str, path: str) -> None:
    """Post the off-policy groups of a JSONL file (one per line, as in a file of purpose
    offpolicy) to a run, for its off-policy slots."""
    rows = read_jsonl(path)
    with connect() as client:
        for start in range(0, len(rows), GROUPS_PER_REQUEST):
            status = client.post_groups(run_id, rows[start : start + GROUPS_PER_REQUEST])
            click.echo(
                f"posted {start + status['accepted']}/{len(rows)} groups; "
                f"{status['pending']} wait for the run's {status['slots_per_step']} "
                "off-policy slots a step"
            )


@runs_group.command("rescore")
@click.argument("run_id")
@click.argument("reward_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--wait", is_flag=True, help="follow it until it ends, then print it")
def runs_rescore(run_id: str, reward_path: str, wait: bool) -> None:
    """Re-score an ended run's samples with the reward in REWARD_PATH (YAML or JSON, a run
    spec's `reward`); the re-scored groups become an offpolicy file (its file_id)."""
    reward = read_document(reward_path)
    with connect() as client:
        rescore = client.rescore(run_id, reward)
        while wait and rescore["status"] in RESCORE_ACTIVE:
            click.echo(
                f"{rescore['status']}: {rescore['samples_scored']}/"
                f"{rescore['samples_total']} samples re-scored",
                err=True,
            )
            time.sleep(1.0)
            rescore = client.get_rescore(run_id, rescore["id"])
        print_json(rescore)
        sys.exit(1 if rescore["status"] == RescoreStatus.FAILED else 0)


@click.command()
@click.argument("model")
@click.argument("prompt")
@click.option("-n", "--n", "n", type=click.IntRange(1, 128), default=1, show_default=True)
@click.option("--max-tokens", type=click.IntRange(1), default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(0), default=1.0, show_default=True)
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0)
@click.option("--seed", type=int, default=None)
@click.option("--system", default=None, help="a system message before the prompt")
@click.option("--text", is_flag=True, help="the prompt as text (/v1/completions), no chat template")
@json_option
def sample(
    model: str,
    prompt: str,
    n: int,
    max_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    system: str | None,
    text: bool,
    as_json: bool,
) -> None:
    """Sample MODEL (a checkpoint ckpt_… or a run run_…, whose newest weights) on PROMPT."""
    if text and system:
        raise CliError("--system is a chat message: leave it out with --text")
    params = {"n": n, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
    if seed is not None:
        params["seed"] = seed
    messages = [{"role": "system", "content": system}] if system else []
    with connect() as client:
        if not as_json:
            click.echo(
                f"sampling {model} (the first request for a model waits while it loads)", err=True
            )
        if text:
            answer = client.sample(model, prompt, chat=False, **params)
        else:
            messages.append({"role": "user", "content": prompt})
            answer = client.sample(model, messages, **params)
    if as_json:
        print_json(answer)
        return
    for choice in answer["choices"]:
        if n > 1:
            click.echo(f"--- {choice['index'] + 1} ({choice.get('finish_reason')})")
        message = choice.get("message") or {}
        click.echo(choice["text"] if text else message.get("content") or "")
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {}
            click.echo(f"[tool call] {function.get('name')}({function.get('arguments')})")
    usage = answer.get("usage") or {}
    click.echo(
        f"{usage.get('prompt_tokens', '?')} prompt tokens, "
        f"{usage.get('completion_tokens', '?')} sampled",
        err=True,
    )


COMMANDS = (files_group, submit, runs_group, sample)
