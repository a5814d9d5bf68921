"""How the client commands print: human text by default (tables of plain columns, times as
ages or clock times), the API's JSON objects with --json for scripts. What a command answers goes
to standard output; notes and progress to standard error, so that a pipe gets only the answer."""

import json
from datetime import UTC, datetime

import click

json_option = click.option("--json", "as_json", is_flag=True, help="print the API's JSON object")
quiet_option = click.option("-q", "--quiet", is_flag=True, help="print only the id")


def print_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def table(headers: list[str], rows: list[list], empty: str) -> None:
    """Left-aligned columns, two spaces apart, each as wide as its widest cell; `empty` (on
    standard error) when there are no rows. Nothing is cut: a narrow terminal wraps lines, a
    pipe gets them whole."""
    if not rows:
        click.echo(empty, err=True)
        return
    cells = [[cell(value) for value in row] for row in rows]
    widths = [max(len(r[i]) for r in [headers, *cells]) for i in range(len(headers))]
    for row in [headers, *cells]:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def answer(item: dict, as_json: bool, quiet: bool, said: str) -> None:
    """What a command made: the API's object (--json), its id alone (-q), or `said`."""
    click.echo(
        json.dumps(item, indent=2, default=str) if as_json else item["id"] if quiet else said
    )


def listing(items: list[dict], as_json: bool, headers: list[str], row, empty: str) -> None:
    """`items` as the API's JSON list, or as a table of `row(item)` under `headers`."""
    if as_json:
        print_json(items)
    else:
        table(headers, [row(item) for item in items], empty)


def paused(run: dict) -> str:
    """What following a run says when it stops at a pause."""
    return (
        f"{run['id']} is paused at step {run['step']}; `gvpo runs resume {run['id']}` continues it"
    )


def cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def when(text: str | None) -> datetime | None:
    """An API timestamp (ISO 8601, UTC) as an aware datetime."""
    if not text:
        return None
    stamp = datetime.fromisoformat(text)
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


def age(text: str | None, now: datetime | None = None) -> str:
    """How long ago: "12s ago", "3m ago", "5h ago", "2d ago"."""
    stamp = when(text)
    if stamp is None:
        return "-"
    seconds = max(0, int(((now or datetime.now(UTC)) - stamp).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def local_time(text: str | None) -> str:
    """An API timestamp in this machine's time zone, to the second."""
    stamp = when(text)
    return stamp.astimezone().strftime("%Y-%m-%d %H:%M:%S") if stamp else "-"


def size(count: int) -> str:
    """A byte count in binary units: "812 B", "3.4 MiB"."""
    amount = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024 or unit == "GiB":
            return f"{count} B" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    raise AssertionError("unreachable")
