"""The commands that run the service on this machine: the embedded stack (`gvpo up`), the API or
a worker alone, the demo, and the offline tiny model and its task's dataset."""

import signal
import sys
import time
from pathlib import Path

import click

from service.cli.boundary import CliError
from service.config import get_settings


@click.command()
@click.option("--steps", type=int, default=None, help="training steps (default: the demo's own)")
@click.option("--port", type=int, default=None, help="API port (default: a free one)")
@click.option(
    "--task",
    type=click.Choice(["copy", "episodes"]),
    default="copy",
    show_default=True,
    help="copy: single completions; episodes: two-turn episodes with the secret_code environment",
)
def demo(steps: int | None, port: int | None, task: str) -> None:
    """Train the offline tiny model with GVPO through the API, worker and database."""
    from service.demo import run_demo

    sys.exit(run_demo(get_settings(), steps=steps, port=port, task=task))


def _raise_interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@click.command()
def up() -> None:
    """Run the embedded stack (API + worker, SQLite, file broker) until Ctrl-C or SIGTERM.

    It refuses at once, starting nothing, when another stack uses its data directory or its
    ports are taken. The API's and the worker's own output goes to <data dir>/logs."""
    from service.migrate import prepare
    from service.stack import Stack

    settings = get_settings()
    # Also when started in the background (where SIGINT is inherited as ignored) or by a
    # supervisor that sends SIGTERM: both stop the children before exiting.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_interrupt)
    stack = Stack(settings, log_dir=settings.resolved_data_dir / "logs")
    try:
        stack.claim()  # the data directory and the ports, before anything starts
        prepare(settings)
        stack.start()
        _say_up(stack)
        while not (exited := stack.exited()):
            time.sleep(0.5)
        raise CliError(f"{exited}; the stack stopped")
    except KeyboardInterrupt:
        click.echo("\nstopping…", err=True)
    finally:
        stack.stop()


def _say_up(stack) -> None:
    """Where the stack serves, keeps its data and writes its logs: once, when it is ready."""
    settings, url = stack.settings, stack.url
    grpc = (
        f"gRPC {settings.api_host}:{settings.grpc_port}"
        if settings.grpc_port
        else "gRPC off (GVPO_GRPC_PORT=0)"
    )
    click.echo(
        f"gvpo is up: API {url} (docs at {url}/docs, dashboard at {url}/dashboard), {grpc}\n"
        f"  data directory: {settings.resolved_data_dir}\n"
        f"  logs: {stack.log('api')}, {stack.log('worker')}\n"
        "Ctrl-C stops it."
    )


@click.command()
def api() -> None:
    """Run only the API server: REST on GVPO_API_PORT, gRPC on GVPO_GRPC_PORT (GVPO_API_HOST)."""
    from service.edge import serve
    from service.main import UnsafeSettings, create_app

    settings = get_settings()
    try:
        app = create_app(settings)
    except UnsafeSettings as exc:
        raise click.ClickException(str(exc)) from None
    serve(app, settings.api_host, settings.api_port)


@click.command()
@click.option("--queues", default=None, help="comma-separated queues (default GVPO_WORKER_QUEUES)")
def worker(queues: str | None) -> None:
    """Run only a worker (one run at a time)."""
    from workers.worker import run_worker

    run_worker(get_settings(), queues)


@click.command()
@click.option(
    "--memory-gib",
    type=float,
    default=None,
    help="models' memory budget (default GVPO_SERVE_MEMORY_GIB)",
)
def serve(memory_gib: float | None) -> None:
    """Run an inference worker: serves models to the API's OpenAI-compatible endpoints."""
    from workers.serving.worker import run_inference_worker

    settings = get_settings()
    if memory_gib is not None:
        settings = settings.model_copy(update={"serve_memory_gib": memory_gib})
    run_inference_worker(settings)


@click.command("make-tiny-model")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0)
def make_tiny_model_cmd(directory: Path, seed: int) -> None:
    """Write an offline tiny Llama-architecture model and character tokenizer."""
    from transformers.utils import logging as hf_logging

    from workers.tiny_model import make_tiny_model

    hf_logging.disable_progress_bar()  # a few MB written at once: a progress bar is noise
    click.echo(str(make_tiny_model(directory, seed=seed)))


@click.command("make-copy-dataset")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--rows", type=click.IntRange(1), default=500, show_default=True)
@click.option("--seed", type=int, default=0)
def make_copy_dataset_cmd(path: Path, rows: int, seed: int) -> None:
    """Write the demo's training file: JSONL rows like {"prompt": "bdj=", "answer": "bdj"}, a
    task the tiny model learns in a few hundred steps."""
    from service.demo import write_dataset

    click.echo(str(write_dataset(path, rows=rows, seed=seed)))


COMMANDS = (up, api, worker, serve, demo, make_tiny_model_cmd, make_copy_dataset_cmd)
