"""The YAML (or JSON) documents the CLI sends: a run spec, a reward. Read here, and refused with
a message before anything is sent when no spec could be what they hold."""

from pathlib import Path

import click

MAX_DOCUMENT_BYTES = 16 * 2**20
MAX_DOCUMENT_NODES = 1_000_000


def read_document(path: str) -> dict:
    """A YAML (or JSON) file's mapping, refused with a message when it is larger than a spec can
    be: over 16 MiB, or more than a million values once its aliases are expanded (an alias bomb
    is a few lines that expand to billions when sent)."""
    import yaml

    if Path(path).stat().st_size > MAX_DOCUMENT_BYTES:
        raise click.ClickException(f"{path} is larger than {MAX_DOCUMENT_BYTES >> 20} MiB")
    try:
        document = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise click.ClickException(f"{path} is not valid YAML: {_where(exc)}") from None
    except UnicodeDecodeError:
        raise click.ClickException(f"{path} is not text: a YAML or JSON file is expected") from None
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
    if not isinstance(document, dict):
        raise click.ClickException(
            f"{path} holds {'nothing' if document is None else f'a {type(document).__name__}'}"
            ": a mapping of fields (`model: ...` lines, or a JSON object) is expected"
        )
    return document


def _where(exc) -> str:
    """A YAML error on one line: where, what, and what it was inside of (PyYAML's own text
    spans five lines, with carets)."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is None or not problem:
        return " ".join(str(exc).split())
    said = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and start:
        said += f" ({context} from line {start.line + 1}, column {start.column + 1})"
    return said


def read_jsonl(path: str) -> list:
    """The rows of a JSONL file (one JSON value a line; blank lines skipped), refused with the
    number of the first line that is not JSON."""
    import json

    rows = []
    try:
        with open(path, encoding="utf-8") as fh:
            lines = list(fh)
    except UnicodeDecodeError:
        raise click.ClickException(f"{path} is not UTF-8 text: JSONL is expected") from None
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise click.ClickException(
                    f"{path}, line {number}, is not JSON: {exc.msg}"
                ) from None
    return rows
