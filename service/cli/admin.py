"""The operator's commands, on this machine's database: migrations, the webhook secrets'
encryption key, API keys and the registered base models. Each imports what it uses when it runs:
every `gvpo` command imports this module, and Alembic alone took half of the CLI's start-up."""

import click
from click.core import ParameterSource

from service.cli.output import json_option, listing, local_time
from service.config import get_settings


@click.group("db")
def db_group() -> None:
    """Database administration."""


@db_group.command("upgrade")
def db_upgrade() -> None:
    """Apply migrations up to the latest schema."""
    from service.migrate import prepare

    settings = get_settings()
    prepare(settings)
    click.echo(f"database at head: {settings.resolved_database_url}")


@db_group.command("reencrypt")
def db_reencrypt() -> None:
    """Re-encrypt the stored webhook secrets under the first GVPO_ENCRYPTION_KEY, after which
    the older keys listed after it can be dropped."""
    from service.contract.sealing import SealingError
    from service.db import session_scope
    from service.rewards.service import reencrypt_secrets

    settings = get_settings()
    try:
        with session_scope(settings.resolved_database_url) as session:
            done = reencrypt_secrets(session, settings.sealer)
    except SealingError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"re-encrypted the webhook secrets of {done} runs under the newest key")


@click.group("api-key")
def api_key_group() -> None:
    """API keys (admin)."""


@api_key_group.command("create")
@click.option("--project", required=True, help="project name (created if new)")
def api_key_create(project: str) -> None:
    """Make a project's API key; it is printed once and only its hash is stored."""
    from service.auth.service import create_api_key
    from service.db import session_scope
    from service.migrate import prepare

    settings = get_settings()
    if problems := [p for p in settings.unsafe_secrets() if "PEPPER" in p]:
        raise click.ClickException(problems[0])  # a key made now would never match later
    prepare(settings)
    with session_scope(settings.resolved_database_url) as session:
        proj, key = create_api_key(session, project, settings.api_key_pepper)
    click.echo(f"project {proj.name} ({proj.id}); API key (shown once):", err=True)
    click.echo(key)


@api_key_group.command("list")
@click.option("--project", default=None, help="only this project's keys")
@json_option
def api_key_list(project: str | None, as_json: bool) -> None:
    """The API keys (never the keys themselves: their first characters), oldest first."""
    from service.auth.service import list_api_keys

    keys = _admin(
        lambda session, _: [
            {
                "id": key.id,
                "project": name,
                "prefix": key.prefix,
                "created_at": key.created_at.isoformat(),
                "revoked_at": key.revoked_at and key.revoked_at.isoformat(),
            }
            for key, name in list_api_keys(session, project)
        ]
    )
    listing(
        keys,
        as_json,
        ["ID", "PROJECT", "PREFIX", "CREATED", "REVOKED"],
        lambda k: [
            k["id"],
            k["project"],
            k["prefix"] + "…",
            local_time(k["created_at"]),
            local_time(k["revoked_at"]) if k["revoked_at"] else "-",
        ],
        "no API keys: `gvpo api-key create --project NAME` makes one",
    )


@api_key_group.command("revoke")
@click.argument("key_id")
def api_key_revoke(key_id: str) -> None:
    """Refuse the key KEY_ID (an id from `gvpo api-key list`) from now on."""
    from service.auth.service import revoke_api_key

    revoked = _admin(lambda session, _: revoke_api_key(session, key_id)[1])
    click.echo(f"revoked {key_id}" if revoked else f"{key_id} was already revoked")


@click.group("models")
def models_group() -> None:
    """Base models any project may train (admin): runs name them in model.path."""


def _admin(action):
    """Run `action(session, settings)` on this machine's database; a refusal is an error
    message, not a traceback."""
    from service.db import session_scope
    from service.errors import ServiceError
    from service.migrate import prepare

    settings = get_settings()
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

    folder = _admin(lambda session, settings: register_model(session, settings, name, path).path)
    click.echo(f"{name} -> {folder}")


@models_group.command("list")
def models_list() -> None:
    """The registered base models and their folders."""
    from service.registry.service import list_models

    for name, path in _admin(lambda s, _: [(m.name, m.path) for m in list_models(s)]):
        click.echo(f"{name}\t{path}")


@models_group.command("remove")
@click.argument("name")
def models_remove(name: str) -> None:
    """Unregister NAME (runs already submitted with it keep it)."""
    from service.registry.service import remove_model

    _admin(lambda session, _: remove_model(session, name))
    click.echo(f"removed {name}")


@click.group("quota")
def quota_group() -> None:
    """Projects' quotas (admin): runs over them wait queued, saying why."""


def _limit(kind):
    """A click type: a number of `kind`, or "none" (the project goes back to the default)."""

    def parse(text: str):
        if text.strip().lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            raise click.BadParameter(f"{text!r} is neither a number nor 'none'") from None

    parse.__name__ = f"{kind.__name__} or none"
    return parse


@quota_group.command("set")
@click.option("--project", required=True, help="project name")
@click.option("--max-concurrent-runs", type=_limit(int), help="runs started at once, or none")
@click.option("--max-gpus", type=_limit(int), help="devices held at once, or none")
@click.option("--gpu-hours", type=_limit(float), help="device-hours in all, or none")
def quota_set(project: str, **limits) -> None:
    """Give PROJECT its own limits; `none` puts one back to the default (GVPO_QUOTA_*).
    Runs waiting for the quota start on the scheduler's next pass."""
    from service.usage.service import set_quota

    ctx = click.get_current_context()
    given = {
        name: value
        for name, value in limits.items()
        if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE
    }
    if not given:
        raise click.UsageError("give one or more of --max-concurrent-runs, --max-gpus, --gpu-hours")
    _admin(lambda session, _: set_quota(session, project, given))
    shown = ", ".join(f"{name}={'default' if v is None else v}" for name, v in given.items())
    click.echo(f"quota of {project}: {shown}")


@quota_group.command("show")
@click.option("--project", default=None, help="only this project")
@json_option
def quota_show(project: str | None, as_json: bool) -> None:
    """Each project's quota in force and the device-hours its runs used."""
    from service.usage.service import quotas

    rows = _admin(lambda session, settings: quotas(session, settings, project))
    listing(
        rows,
        as_json,
        ["PROJECT", "MAX RUNS", "MAX GPUS", "GPU-HOURS", "USED (H)", "OWN"],
        lambda q: [
            q["project"],
            q["max_concurrent_runs"] or "-",
            q["max_gpus"] or "-",
            "-" if q["gpu_hours"] is None else f"{q['gpu_hours']:g}",
            f"{q['gpu_hours_used']:.3f}",
            ", ".join(q["own"]) or "-",
        ],
        "no projects: `gvpo api-key create --project NAME` makes one",
    )


COMMANDS = (db_group, api_key_group, models_group, quota_group)
