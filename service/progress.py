"""Following a run in the terminal over its live stream: a progress bar with the latest
metrics, and the run's events as they happen. A dropped connection resumes where it stopped."""

import time
from collections import deque

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from gvpo_client import Client

SHOWN = (("loss", "loss"), ("kl/ref", "kl"), ("throughput/tokens_per_s", "tok/s"))
RECONNECTS = 20


def _describe(rewards: deque, latest: dict[str, float]) -> str:
    parts = [f"reward {sum(rewards) / len(rewards):.3f}" if rewards else "reward –"]
    parts += [f"{label} {latest[name]:.4g}" for name, label in SHOWN if name in latest]
    return " · ".join(parts)


def follow_run(client: Client, run_id: str, console: Console | None = None) -> dict:
    """Show progress until the run finishes; prints its events as they arrive. Returns the run.

    The reward shown is the mean of reward/mean over the last 10 steps. An API that cannot be
    reached, or a run it does not have, fails at once; a stream that breaks later is resumed."""
    client.get_run(run_id)
    console = console or Console(log_path=False)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[metrics]}"),
        TimeElapsedColumn(),
    )
    after, since, rewards, latest = None, 0, deque(maxlen=10), {}
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(run_id, total=None, metrics="")
        for attempt in range(RECONNECTS + 1):
            try:
                for kind, data in client.follow(run_id, after, since):
                    if kind == "run":
                        bar.update(
                            task,
                            total=data["total_steps"],
                            completed=data["step"],
                            description=f"{run_id} {data['status']}",
                        )
                    elif kind == "metrics":
                        since = data["step"]
                        latest = data["values"]
                        if "reward/mean" in latest:
                            rewards.append(latest["reward/mean"])
                        bar.update(task, completed=since, metrics=_describe(rewards, latest))
                    else:
                        after = data["id"]
                        console.log(f"{data['type']}: {data['message']}")
                break  # the stream ends with the run
            except httpx.TransportError as exc:
                if attempt == RECONNECTS:
                    raise
                console.log(
                    f"[yellow]stream interrupted ({exc.__class__.__name__}); reconnecting[/yellow]"
                )
                time.sleep(min(2**attempt, 10))
    return client.get_run(run_id)
