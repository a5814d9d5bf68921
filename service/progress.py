"""Following a run in the terminal over its live stream: a progress bar with the latest
metrics, and the run's events as they happen, each at the time it happened (attaching to a run
under way replays its earlier events with their own times). A dropped connection resumes where
it stopped. Following stops when the run ends, or when it is paused (it may never resume)."""

import time
from collections import deque
from contextlib import closing
from datetime import datetime

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column
from rich.text import Text

from gvpo_client import Client
from service.cli.output import when
from service.contract.metrics import REWARD_MEAN
from service.contract.states import RunStatus

SHOWN = (("loss", "loss"), ("kl/ref", "kl"), ("throughput/tokens_per_s", "tok/s"))
RECONNECTS = 20
WIDE = 140  # columns: narrower, one line of text (cut to fit) in place of the bar
# The reward shown is smoothed over this many steps, and says so: the run's own `reward` (runs
# list, runs show) is its last step's alone, which a few prompts a step make noisy.
SMOOTHING = 10


def _describe(rewards: deque, latest: dict[str, float]) -> str:
    mean = f"{sum(rewards) / len(rewards):.3f}" if rewards else "–"
    parts = [f"reward {mean} ({SMOOTHING}-step mean)"]
    parts += [f"{label} {latest[name]:.4g}" for name, label in SHOWN if name in latest]
    return " · ".join(parts)


def _columns(width: int) -> tuple:
    """The bar's columns for a terminal `width` wide. Each text is cut to fit (with an
    ellipsis), never wrapped: a wrapped line would leave copies behind as the bar redraws."""
    cut = {"no_wrap": True, "overflow": "ellipsis"}
    if width < WIDE:  # one text: status, steps, then as many numbers as fit
        line = "[bold]{task.fields[status]}[/bold] {task.fields[steps]} {task.fields[metrics]}"
        return (TextColumn(line, table_column=Column(ratio=1, **cut)),)
    return (
        TextColumn("[bold]{task.description}", table_column=Column(**cut)),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        TextColumn("{task.fields[metrics]}", table_column=Column(ratio=1, **cut)),
        TimeElapsedColumn(),
    )


def _event_line(event: dict) -> Text:
    """An event at its own time (this machine's clock time; with the date when not today)."""
    local = when(event["created_at"]).astimezone()
    shown = local.strftime(
        "%H:%M:%S" if local.date() == datetime.now().date() else "%m-%d %H:%M:%S"
    )
    line = Text(f"{shown} ", style="dim")
    line.append(f"{event['type']}: ", style="bold red" if event["level"] == "error" else "")
    line.append(event["message"])  # as written: a message's brackets are not markup
    return line


def follow_run(client: Client, run_id: str, console: Console | None = None) -> dict:
    """Show progress until the run ends or is paused; prints its events as they arrive.
    Returns the run.

    The reward shown is the mean of reward/mean over the last SMOOTHING steps. An API that
    cannot be reached, or a run it does not have, fails at once; a stream that breaks later is
    resumed."""
    console = console or Console(log_path=False)
    after, since, rewards, latest = None, 0, deque(maxlen=SMOOTHING), {}
    run = client.get_run(run_id)

    def show_event(event: dict) -> None:
        nonlocal after
        after = event["id"]
        console.print(_event_line(event))

    with Progress(*_columns(console.width), console=console, transient=False) as bar:
        task = bar.add_task(run_id, total=None, metrics="", status="", steps="")
        for attempt in range(RECONNECTS + 1):
            try:
                with closing(client.follow(run_id, after, since)) as updates:
                    for kind, data in updates:
                        if kind == "run":
                            run = data
                            bar.update(
                                task,
                                total=data["total_steps"],
                                completed=data["step"],
                                description=f"{run_id} {data['status']}",
                                status=data["status"],
                                steps=f"{data['step']}/{data['total_steps']}",
                            )
                            if data["status"] == RunStatus.PAUSED:
                                break
                        elif kind == "metrics":
                            since, latest = data["step"], data["values"]
                            if REWARD_MEAN in latest:
                                rewards.append(latest[REWARD_MEAN])
                            bar.update(task, completed=since, metrics=_describe(rewards, latest))
                        else:
                            show_event(data)
                break  # the stream ends with the run; a pause ends following
            except httpx.TransportError as exc:
                if attempt == RECONNECTS:
                    raise
                console.print(
                    f"[yellow]stream interrupted ({exc.__class__.__name__}); reconnecting[/yellow]"
                )
                time.sleep(min(2**attempt, 10))
        if run["status"] != RunStatus.PAUSED:
            run = client.get_run(run_id)
        # A paused run's stream stays open, so the events up to the pause are read here.
        for event in client.events(run_id, after):
            show_event(event)
    return run
