"""The `gvpo` command: admin (db, keys), the embedded stack, the demo, and an API client."""

import json
import signal
import sys
import time
from pathlib import Path

import click

from service.config import Settings, get_settings
from service.contract.files import FilePurpose
from service.contract.states import RESCORE_ACTIVE, RescoreStatus, RunStatus
from service.migrate import prepare


def _settings() -> Settings:
    return get_settings()


def _client():
    from service.client import Client

    settings = _settings()
    if not settings.api_key:
        raise click.UsageError(
            "set GVPO_API_KEY (make one with `gvpo api-key create --project NAME`)"
        )
    return Client(settings.resolved_api_url, settings.api_key)


def _print_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group()
def main() -> None:
    """GVPO post-training service."""


@main.command()
@click.option("--steps", type=int, default=None, help="training steps (default: the demo's own)")
@click.option("--port", type=int, default=None, help="API port (default: a free one)")
def demo(steps: int | None, port: int | None) -> None:
    """Train the offline tiny model with GVPO through the API, worker and database."""
    from service.demo import run_demo

    sys.exit(run_demo(_settings(), steps=steps, port=port))


def _raise_interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@main.command()
def up() -> None:
    """Run the embedded stack (API + worker, SQLite, file broker) until Ctrl-C or SIGTERM."""
    from service.stack import Stack

    settings = _settings()
    prepare(settings)
    # Also when started in the background (where SIGINT is inherited as ignored) or by a
    # supervisor that sends SIGTERM: both stop the children before exiting.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_interrupt)
    stack = Stack(settings)
    try:
        stack.start()
        grpc = f", gRPC {settings.api_host}:{settings.grpc_port}" if settings.grpc_port else ""
        click.echo(
            f"gvpo is up: API {stack.url} (docs at {stack.url}/docs, dashboard at "
            f"{stack.url}/dashboard){grpc}, data in {settings.resolved_data_dir}. "
            "Ctrl-C stops it."
        )
        while all(p.poll() is None for p in stack.procs.values()):
            time.sleep(0.5)
        click.echo("a child process exited; stopping", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("\nstopping…", err=True)
    finally:
        stack.stop()


@main.command()
def api() -> None:
    """Run only the API server: REST on GVPO_API_PORT, gRPC on GVPO_GRPC_PORT (GVPO_API_HOST)."""
    import uvicorn

    from service.edge import SERVER
    from service.main import UnsafeSettings, create_app

    settings = _settings()
    try:
        app = create_app(settings)
    except UnsafeSettings as exc:
        raise click.ClickException(str(exc)) from None
    uvicorn.run(app, host=settings.api_host, port=settings.api_port, log_level="info", **SERVER)


@main.command()
@click.option("--queues", default=None, help="comma-separated queues (default GVPO_WORKER_QUEUES)")
def worker(queues: str | None) -> None:
    """Run only a worker (one run at a time)."""
    from workers.worker import run_worker

    run_worker(_settings(), queues)


@main.command("make-tiny-model")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0)
def make_tiny_model_cmd(directory: Path, seed: int) -> None:
    """Write an offline tiny Llama-architecture model and character tokenizer."""
    from workers.tiny_model import make_tiny_model

    click.echo(str(make_tiny_model(directory, seed=seed)))


@main.group("db")
def db_group() -> None:
    """Database administration."""


@db_group.command("upgrade")
def db_upgrade() -> None:
    """Apply migrations up to the latest schema."""
    settings = _settings()
    prepare(settings)
    click.echo(f"database at head: {settings.resolved_database_url}")


@db_group.command("reencrypt")
def db_reencrypt() -> None:
    """Re-encrypt the stored webhook secrets under the first GVPO_ENCRYPTION_KEY, after which
    the older keys listed after it can be dropped."""
    from service.contract.sealing import SealingError
    from service.db import session_scope
    from service.rewards.service import reencrypt_secrets

    settings = _settings()
    try:
        with session_scope(settings.resolved_database_url) as session:
            done = reencrypt_secrets(session, settings.sealer)
    except SealingError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"re-encrypted the webhook secrets of {done} runs under the newest key")


@main.group("api-key")
def api_key_group() -> None:
    """API keys (admin)."""


@api_key_group.command("create")
@click.option("--project", required=True, help="project name (created if new)")
def api_key_create(project: str) -> None:
    """Make a project's API key; it is printed once and only its hash is stored."""
    from service.auth.service import create_api_key
    from service.db import session_scope

    settings = _settings()
    if problems := [p for p in settings.unsafe_secrets() if "PEPPER" in p]:
        raise click.ClickException(problems[0])  # a key made now would never match later
    prepare(settings)
    with session_scope(settings.resolved_database_url) as session:
        proj, key = create_api_key(session, project, settings.api_key_pepper)
    click.echo(f"project {proj.name} ({proj.id}); API key (shown once):", err=True)
    click.echo(key)


@main.group("models")
def models_group() -> None:
    """Base models any project may train (admin): runs name them in model.path."""


def _registry(action):
    """Run `action(session, settings)` on this machine's database; a refusal is an error
    message, not a traceback."""
    from service.db import session_scope
    from service.errors import ServiceError

    settings = _settings()
    prepare(settings)
    try:
        with session_scope(settings.resolved_database_url) as session:
            return action(session, settings)
    except ServiceError as exc:
        raise click.ClickException(exc.message) from None


@models_group.command("add")
@click.argument("name")
@click.argument("path")
def models_add(name: str, path: str) -> None:
    """Register the model folder PATH as NAME (again: move NAME to PATH)."""
    from service.registry.service import register_model

    folder = _registry(lambda session, settings: register_model(session, settings, name, path).path)
    click.echo(f"{name} -> {folder}")


@models_group.command("list")
def models_list() -> None:
    """The registered base models and their folders."""
    from service.registry.service import list_models

    for name, path in _registry(lambda s, _: [(m.name, m.path) for m in list_models(s)]):
        click.echo(f"{name}\t{path}")


@models_group.command("remove")
@click.argument("name")
def models_remove(name: str) -> None:
    """Unregister NAME (runs already submitted with it keep it)."""
    from service.registry.service import remove_model

    _registry(lambda session, _: remove_model(session, name))
    click.echo(f"removed {name}")


@main.group("files")
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


@main.command()
@click.argument("spec_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--idempotency-key", default=None)
@click.option("--wait", is_flag=True, help="follow the run until it finishes")
def submit(spec_path: str, idempotency_key: str | None, wait: bool) -> None:
    """Submit a run spec (YAML or JSON)."""
    spec = _read_document(spec_path)
    with _client() as client:
        run = client.create_run(spec, idempotency_key)
        _print_json(run)
        if wait:
            from service.progress import follow_run

            sys.exit(0 if follow_run(client, run["id"])["status"] == RunStatus.SUCCEEDED else 1)


@main.group("runs")
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
    succeeded)."""
    from service.progress import follow_run

    with _client() as client:
        sys.exit(0 if follow_run(client, run_id)["status"] == RunStatus.SUCCEEDED else 1)


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


GROUPS_PER_REQUEST = 1000  # the API's limit for one POST .../groups


@runs_group.command("add-groups")
@click.argument("run_id")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
def runs_add_groups(run_id: str, path: str) -> None:
    """Post the off-policy groups of a JSONL file (one per line, as in a file of purpose
    offpolicy) to a run, for its off-policy slots."""
    from service.contract.files import read_rows

    rows = read_rows(path)
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
    reward = _read_document(reward_path)
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


MAX_DOCUMENT_BYTES = 16 * 2**20
MAX_DOCUMENT_NODES = 1_000_000


def _read_document(path: str):
    """A YAML (or JSON) file as data, refused with a message when it is larger than a spec can
    be: over 16 MiB, or more than a million values once its aliases are expanded (an alias bomb
    is a few lines that expand to billions when sent)."""
    import yaml

    if Path(path).stat().st_size > MAX_DOCUMENT_BYTES:
        raise click.ClickException(f"{path} is larger than {MAX_DOCUMENT_BYTES >> 20} MiB")
    try:
        document = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise click.ClickException(f"{path} is not valid YAML: {exc}") from None
    except RecursionError:
        raise click.ClickException(f"{path} nests too deeply to be a spec") from None
    waiting, seen = [document], 0  # walked without recursion: a document may nest deeply
    while waiting:
        node = waiting.pop()
        seen += 1
        if seen > MAX_DOCUMENT_NODES:
            raise click.ClickException(
                f"{path} expands to more than {MAX_DOCUMENT_NODES:,} values "
                "(YAML aliases repeated within each other, or one that contains itself?)"
            )
        if isinstance(node, dict):
            waiting.extend(node.values())
        elif isinstance(node, list):
            waiting.extend(node)
    return document


def run() -> None:
    from service.client import ApiError

    try:
        main(standalone_mode=True)
    except ApiError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    run()
