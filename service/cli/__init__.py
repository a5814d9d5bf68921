"""The `gvpo` command: the embedded stack and the servers (server.py), the operator's commands
on this machine's database (admin.py), and an API client (remote.py; results.py reads what a
run recorded). Every command runs inside one error boundary (boundary.py): a user sees a
message and an exit code, never a traceback."""

import click

from service import installed_version
from service.cli import admin, remote, results, server
from service.cli.boundary import Gvpo


def _print_version(ctx: click.Context, _param, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    click.echo(f"gvpo {installed_version()}")
    ctx.exit()


@click.group(cls=Gvpo)
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the installed version and exit.",
)
def main() -> None:
    """GVPO post-training service. GVPO_DEBUG=1 shows the traceback of an error."""


for command in (*server.COMMANDS, *admin.COMMANDS, *remote.COMMANDS, *results.COMMANDS):
    main.add_command(command)


def run() -> None:
    """The `gvpo` entry point (also of `python -m service.cli`: its usage lines and its shell
    completion, _GVPO_COMPLETE, say gvpo too)."""
    main(prog_name="gvpo")
