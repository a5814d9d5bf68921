"""Following a run in the terminal: a live progress bar with the current reward."""

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from service.client import Client


def follow_run(client: Client, run_id: str, console: Console | None = None) -> dict:
    """Show progress until the run finishes; prints its events as they arrive. Returns the run."""
    console = console or Console()
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[reward]}"), TimeElapsedColumn())
    last_event = None
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(run_id, total=None, reward="")

        def on_poll(run: dict) -> None:
            nonlocal last_event
            for event in client.events(run_id, after=last_event):
                last_event = event["id"]
                console.log(f"{event['type']}: {event['message']}")
            reward = client.metrics(run_id, ["reward/mean"], since_step=max(run["step"] - 9, 0))
            points = [v for _, v in reward.get("reward/mean", [])]
            shown = f"reward {sum(points) / len(points):.3f}" if points else "reward –"
            bar.update(task, total=run["total_steps"], completed=run["step"],
                       description=f"{run_id} {run['status']}", reward=shown)

        run = client.wait(run_id, poll_s=0.5, on_poll=on_poll)
    return run
