"""Dataset files as both sides read them: JSONL, one JSON object per line, blank lines skipped.

The API validates an upload line by line before recording it (service/files), so a file named
by a run is well-formed; the worker reads its rows, and writes the files it makes the same way.
"""

import json
from enum import StrEnum
from pathlib import Path


class FilePurpose(StrEnum):
    TRAIN = "train"  # rows of prompts (and answers)
    EVAL = "eval"  # the same, for evaluation
    OFFPOLICY = "offpolicy"  # groups of completions made elsewhere (service/contract/groups.py)
    # OpenAI's purpose for fine-tuning data: chat rows (service/contract/chat.py
    # fine_tune_problem), the prompts of a fine-tuning job (service/fine_tuning) or of a run
    FINE_TUNE = "fine-tune"


def read_rows(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def numbered_rows(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, row) for each row: numbered as the upload numbers lines, blank ones too."""
    with open(path, "rb") as fh:
        return [(number, json.loads(raw)) for number, raw in enumerate(fh, start=1) if raw.strip()]


def write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def scalar_fields(row: dict) -> list[str]:
    """The fields of a row that hold a string or a number: what a run's prompt_field and
    answer_field may name."""
    return [
        k for k, v in row.items() if isinstance(v, (str, int, float)) and not isinstance(v, bool)
    ]


def common_fields(rows: list[dict]) -> list[str]:
    """The scalar fields every row has, sorted (a file's `fields`)."""
    common = set(scalar_fields(rows[0])) if rows else set()
    for row in rows[1:]:
        common &= set(scalar_fields(row))
    return sorted(common)
