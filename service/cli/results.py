"""What a run has recorded, read through the API: its events (`runs logs`), metrics, samples and
checkpoints, and a checkpoint downloaded into a folder a model loads from; what the project's
runs used (`usage`) and what a spec would (`estimate`)."""

import csv
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import click

from service.cli.boundary import INTERRUPTED, CliError
from service.cli.documents import read_document
from service.cli.output import (
    age,
    json_option,
    listing,
    local_time,
    paused,
    print_json,
    size,
    table,
)
from service.cli.remote import connect, runs_group
from service.contract.states import TERMINAL, RunStatus

POLL_S = 1.0  # how often `runs logs -f` asks for new events
SHOWN_METRICS = ("reward/mean", "reward/std", "loss", "kl/ref", "response_length/mean")
TABLE_STEPS = 20  # the latest steps `runs metrics` shows as a table, unless --all


@contextmanager
def _following(run_id: str):
    """Ctrl-C stops following, not the run, and says how to come back."""
    try:
        yield
    except KeyboardInterrupt:
        raise CliError(
            f"stopped following; the run goes on: `gvpo runs logs -f {run_id}` follows it again",
            INTERRUPTED,
        ) from None


def _show_event(event: dict, as_json: bool) -> None:
    if as_json:  # one object a line, so that a follower's output is JSONL
        click.echo(json.dumps(event, default=str))
        return
    click.echo(
        f"{local_time(event['created_at'])}  {event['level']:<7}  {event['type']:<18}  "
        f"{event['message']}"
    )


@runs_group.command("logs")
@click.argument("run_id")
@click.option("-f", "--follow", is_flag=True, help="go on until the run ends (or pauses)")
@json_option
def runs_logs(run_id: str, follow: bool, as_json: bool) -> None:
    """A run's events, each at the time it happened: time, level, type, message (with --json,
    one JSON object a line)."""
    with connect() as api, _following(run_id):
        after = None
        while True:
            run = api.get_run(run_id) if follow else None
            for event in api.events(run_id, after):  # those up to the state just read
                _show_event(event, as_json)
                after = event["id"]
            if run is None or run["status"] in TERMINAL:
                return
            if run["status"] == RunStatus.PAUSED:
                click.echo(paused(run), err=True)
                return
            time.sleep(POLL_S)


@runs_group.command("metrics")
@click.argument("run_id")
@click.option("--names", default=None, help="comma-separated metric names (default: the main ones)")
@click.option(
    "--csv", "as_csv", is_flag=True, help="every step as CSV (every metric, unless --names)"
)
@click.option("--all", "every_step", is_flag=True, help=f"every step, not the last {TABLE_STEPS}")
@json_option
def runs_metrics(run_id: str, names: str | None, as_csv: bool, every_step: bool, as_json: bool):
    """A run's metrics, one row per step: a table of the main ones, or CSV."""
    wanted = [n.strip() for n in (names or "").split(",") if n.strip()]
    with connect() as api:
        series = api.metrics(run_id, wanted or None)
    if as_json:
        print_json(series)
        return
    if missing := [n for n in wanted if n not in series]:
        click.echo(
            f"{run_id} has recorded no metric {', '.join(missing)} "
            f"(`gvpo runs metrics {run_id} --csv` shows every one)",
            err=True,
        )
    columns = [n for n in wanted if n in series] or (
        sorted(series) if as_csv else [n for n in SHOWN_METRICS if n in series]
    )
    by_step: dict[int, dict[str, float]] = {}
    for name in columns:
        for step, value in series[name]:
            by_step.setdefault(int(step), {})[name] = value
    steps = sorted(by_step)
    if as_csv:
        out = csv.writer(sys.stdout, lineterminator="\n")
        out.writerow(["step", *columns])
        out.writerows([step, *(by_step[step].get(n, "") for n in columns)] for step in steps)
        return
    if not every_step and len(steps) > TABLE_STEPS:
        click.echo(f"the last {TABLE_STEPS} of {len(steps)} steps (--all: every one)", err=True)
        steps = steps[-TABLE_STEPS:]
    table(
        ["STEP", *columns],
        [[step, *(by_step[step].get(n) for n in columns)] for step in steps],
        f"{run_id} has recorded no step yet",
    )


def _indented(text: str, indent: str) -> str:
    return text.replace("\n", "\n" + indent)


@runs_group.command("samples")
@click.argument("run_id")
@click.option("--step", type=click.IntRange(0), default=None, help="default: the latest step")
@json_option
def runs_samples(run_id: str, step: int | None, as_json: bool) -> None:
    """A step's samples by group: the prompt, then each completion (an episode turn by turn,
    * marking the policy's trained turns) with its reward."""
    with connect() as api:
        answer = api.samples(run_id, step)
    if as_json:
        print_json(answer)
        return
    samples = answer["data"]
    if not samples:
        raise CliError(
            f"{run_id} has no samples"
            + (f" at step {step}" if step is not None else " yet: it has finished no step")
        )
    mean = sum(s["reward"] for s in samples) / len(samples)
    click.echo(f"step {answer['step']}: {len(samples)} samples, mean reward {mean:.4g}")
    group = None
    for sample in samples:
        if sample["group_index"] != group:
            group = sample["group_index"]
            source = "" if sample["source"] == "policy" else f" (from {sample['source']})"
            click.echo(f"\ngroup {group}{source}\n  prompt: {_indented(sample['prompt'], '  ')}")
            if sample["answer"] is not None:
                click.echo(f"  answer: {_indented(sample['answer'], '  ')}")
        if sample.get("episode"):
            _echo_episode(sample)
        else:
            click.echo(f"  {sample['reward']:>8.4f}  {_indented(sample['completion'], ' ' * 12)}")


def _echo_episode(sample: dict) -> None:
    """An episode turn by turn: `*` marks the policy's (trained) turns."""
    episode = sample["episode"]
    click.echo(
        f"  {sample['reward']:>8.4f}  episode ({episode['end']}, {episode['trained_tokens']} of "
        f"{episode['tokens']} tokens trained)"
    )
    for turn in episode["turns"]:
        mark = "*" if turn["trained"] else " "
        calls = [call.get("function", {}) for call in turn.get("tool_calls") or []]
        text = " ".join(
            [turn["content"] or ""]
            + [f"[call {f.get('name')}({f.get('arguments')})]" for f in calls]
        ).strip()
        click.echo(f"           {mark} {turn['role']:>9}: {_indented(text, ' ' * 24)}")


@click.group("checkpoints")
def checkpoints_group() -> None:
    """A run's checkpoints: list them, download one into a folder."""


@checkpoints_group.command("list")
@click.argument("run_id")
@json_option
def checkpoints_list(run_id: str, as_json: bool) -> None:
    """A run's checkpoints, oldest first."""
    with connect() as api:
        checkpoints = api.checkpoints(run_id)
    listing(
        checkpoints,
        as_json,
        ["ID", "STEP", "KIND", "SIZE", "CREATED"],
        lambda c: [c["id"], c["step"], c["kind"], size(c["bytes"]), age(c["created_at"])],
        f"{run_id} has no checkpoint yet",
    )


@checkpoints_group.command("download")
@click.argument("run_id")
@click.argument("ckpt_id", required=False)
@click.option("--merged", is_flag=True, help="a LoRA adapter merged into its base: a whole model")
@click.option(
    "--dir",
    "folder",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="where to unpack it (default: ./CKPT_ID)",
)
def checkpoints_download(run_id: str, ckpt_id: str | None, merged: bool, folder: Path | None):
    """Download a checkpoint (default: the run's latest) and unpack it into a folder that
    transformers (or PEFT, for an adapter) loads; prints the folder."""
    with connect() as api:
        if ckpt_id is None:
            checkpoints = api.checkpoints(run_id)
            if not checkpoints:
                raise CliError(f"{run_id} has no checkpoint yet")
            ckpt_id = max(checkpoints, key=lambda c: c["step"])["id"]
        folder = (folder or Path(ckpt_id)).absolute()
        if folder.exists() and any(folder.iterdir()):
            raise CliError(f"{folder} is not empty: choose another --dir, or empty it")
        folder.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".gvpo-download-") as tmp:
            archive = Path(tmp) / "checkpoint.tar.gz"
            click.echo(
                f"downloading {ckpt_id}{' merged (a worker merges it first)' if merged else ''}",
                err=True,
            )
            api.download_checkpoint(run_id, ckpt_id, archive, "merged" if merged else "stored")
            click.echo(f"unpacking {size(archive.stat().st_size)}", err=True)
            _unpack(archive, Path(tmp) / "unpacked", ckpt_id, folder)
    click.echo(str(folder))


def _unpack(archive: Path, scratch: Path, top: str, folder: Path) -> None:
    """The archive's folder `top` moved to `folder`. tarfile's data filter refuses what a
    checkpoint never holds: absolute paths, paths out of the folder, links out of it, devices."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(scratch, filter="data")
    except tarfile.FilterError as exc:
        raise CliError(f"refused the archive: {exc}; nothing was unpacked") from None
    except tarfile.TarError as exc:
        raise CliError(f"the download is not a readable .tar.gz ({exc}); try again") from None
    if not (scratch / top).is_dir():
        raise CliError(f"the archive holds no folder {top}: {sorted(os.listdir(scratch))}")
    if folder.exists():
        folder.rmdir()  # empty: checked before the download
    shutil.move(scratch / top, folder)


@click.command("usage")
@click.option("--by", "group_by", type=click.Choice(["day", "run"]), default="day")
@click.option("--since", default=None, help="first day counted (YYYY-MM-DD, UTC)")
@click.option("--until", default=None, help="last day counted (YYYY-MM-DD, UTC)")
@json_option
def usage(group_by: str, since: str | None, until: str | None, as_json: bool) -> None:
    """What the project's runs used, per day or per run, and its quota."""
    with connect() as client:
        report = client.usage(group_by, since, until)
    if as_json:
        print_json(report)
        return
    key = "DAY" if group_by == "day" else "RUN"
    table(
        [key, "GPU-S", "CPU-S", "TOKENS GEN", "TOKENS TRAINED", "REWARD CALLS", "ENV CALLS"],
        [
            [
                row["day"] if group_by == "day" else row["run_id"],
                row["gpu_seconds"],
                row["cpu_seconds"],
                row["tokens_generated"],
                row["tokens_trained"],
                row["reward_calls"],
                row["environment_calls"],
            ]
            for row in report["data"]
        ],
        "no usage recorded yet",
    )
    quota = report["quota"]
    limits = ", ".join(
        f"{name} {'none' if quota[name] is None else quota[name]}"
        for name in ("max_concurrent_runs", "max_gpus", "gpu_hours")
    )
    click.echo(f"quota: {limits}; {quota['gpu_hours_used']:.3f} device-hours used", err=True)


@click.command("estimate")
@click.argument("spec_path", type=click.Path(exists=True, dir_okay=False))
@json_option
def estimate(spec_path: str, as_json: bool) -> None:
    """What a run spec (YAML or JSON) would use, before it is submitted."""
    with connect() as client:
        answer = client.estimate(read_document(spec_path))
    if as_json:
        print_json(answer)
        return
    hours = answer["device_hours"]
    click.echo(f"completions:     {answer['completions']} ({answer['steps']} steps)")
    click.echo(f"tokens at most:  {answer['tokens_generated_max']}")
    click.echo(f"devices:         {answer['devices']}")
    click.echo(f"device-hours:    {'unknown' if hours is None else f'{hours:.4g}'}")
    click.echo(f"                 ({answer['basis']})")
    if answer["fits_budget"] is not None:
        click.echo(f"fits the budget: {'yes' if answer['fits_budget'] else 'no'}")


COMMANDS = (checkpoints_group, usage, estimate)
