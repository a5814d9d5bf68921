"""The API client's commands (GVPO_API_URL, GVPO_API_KEY): files, runs, and following a run."""

import json
import sys
import time
from pathlib import Path

import click

from service.cli.boundary import INTERRUPTED, CliError
from service.cli.documents import read_document, read_jsonl
from service.config import get_settings
from service.contract.files import FilePurpose
from service.contract.states import RESCORE_ACTIVE, RescoreStatus, RunStatus

GROUPS_PER_REQUEST = 1000  # the API's limit for one POST .../groups


def _client():
    from gvpo_client import Client

    settings = get_settings()
    if not settings.api_key:
        raise CliError(
            "set GVPO_API_KEY to your project's API key (`gvpo api-key create --project NAME` "
            "makes one, on the API's machine)"
        )
    return Client(settings.resolved_api_url, settings.api_key)


def _print_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _follow(client, run_id: str) -> int:
    """Show the run until it ends; its exit code (0: it succeeded). Ctrl-C stops watching, not
    the run."""
    from service.progress import follow_run

    try:
        run = follow_run(client, run_id)
    except KeyboardInterrupt:
        raise CliError(
            f"stopped watching; the run goes on: re-attach with `gvpo runs watch {run_id}`",
            INTERRUPTED,
        ) from None
    return 0 if run["status"] == RunStatus.SUCCEEDED else 1


@click.group("files")
def files_group() -> None:
    """Dataset files."""


@files_group.command("upload")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--purpose", default="train", type=click.Choice([p.value for p in FilePurpose]))
def files_upload(path: str, purpose: str) -> None:
    with _client() as client:
        _print_json(client.upload_file(path, purpose))


@files_group.command("download")
@click.argument("file_id")
@click.argument("dest", type=click.Path(dir_okay=False, path_type=Path))
def files_download(file_id: str, dest: Path) -> None:
    """Write a file's JSONL to DEST (a rescore's groups, say)."""
    with _client() as client:
        dest.write_bytes(client.file_content(file_id))
    click.echo(str(dest))


@click.command()
@click.argument("spec_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--idempotency-key", default=None)
@click.option("--wait", is_flag=True, help="follow the run until it finishes")
def submit(spec_path: str, idempotency_key: str | None, wait: bool) -> None:
    """Submit a run spec (YAML or JSON)."""
    spec = read_document(spec_path)
    with _client() as client:
        run = client.create_run(spec, idempotency_key)
        _print_json(run)
        if wait:
            sys.exit(_follow(client, run["id"]))


@click.group("runs")
def runs_group() -> None:
    """Inspect and control runs."""


@runs_group.command("list")
@click.option("--status", default=None)
@click.option("--limit", type=int, default=20)
def runs_list(status: str | None, limit: int) -> None:
    with _client() as client:
        for run in client.list_runs(status=status, limit=limit)["data"]:
            click.echo(
                f"{run['id']}  {run['status']:<10} step {run['step']}/{run['total_steps']}"
                f"  {run['name'] or ''}"
            )


@runs_group.command("show")
@click.argument("run_id")
def runs_show(run_id: str) -> None:
    with _client() as client:
        _print_json(client.get_run(run_id))


@runs_group.command("watch")
@click.argument("run_id")
def runs_watch(run_id: str) -> None:
    """Follow a run live: progress, latest metrics and events, until it ends (exit 0 if it
    succeeded). Ctrl-C stops watching; the run goes on."""
    with _client() as client:
        sys.exit(_follow(client, run_id))


@runs_group.command("cancel")
@click.argument("run_id")
def runs_cancel(run_id: str) -> None:
    with _client() as client:
        _print_json(client.cancel_run(run_id))


@runs_group.command("pause")
@click.argument("run_id")
def runs_pause(run_id: str) -> None:
    """Checkpoint after the current step and free the worker; `resume` continues."""
    with _client() as client:
        _print_json(client.pause_run(run_id))


@runs_group.command("resume")
@click.argument("run_id")
def runs_resume(run_id: str) -> None:
    with _client() as client:
        _print_json(client.resume_run(run_id))


@runs_group.command("add-groups")
@click.argument("run_id")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
def runs_add_groups(run_id: str, path: str) -> None:
    """Post the off-policy groups of a JSONL file (one per line, as in a file of purpose
    offpolicy) to a run, for its off-policy slots."""
    rows = read_jsonl(path)
    with _client() as client:
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
    with _client() as client:
        rescore = client.rescore(run_id, reward)
        while wait and rescore["status"] in RESCORE_ACTIVE:
            click.echo(
                f"{rescore['status']}: {rescore['samples_scored']}/"
                f"{rescore['samples_total']} samples re-scored",
                err=True,
            )
            time.sleep(1.0)
            rescore = client.get_rescore(run_id, rescore["id"])
        _print_json(rescore)
        sys.exit(1 if rescore["status"] == RescoreStatus.FAILED else 0)


COMMANDS = (files_group, submit, runs_group)
