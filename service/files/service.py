"""Dataset files: JSONL uploads, validated line by line before anything is recorded."""

import json
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.config import Settings
from service.contract.chat import chat_problem, fine_tune_problem, is_chat
from service.contract.files import FilePurpose, numbered_rows, scalar_fields
from service.contract.groups import group_problem
from service.contract.limits import MAX_FILENAME, has_nul
from service.errors import BadRequest, NotFound, PayloadTooLarge
from service.models import File, Project
from service.models.base import new_id

PURPOSES = tuple(FilePurpose)
_CHUNK = 1 << 20


def _copy_limited(src: BinaryIO, dest: Path, limit: int) -> None:
    size = 0
    with dest.open("wb") as out:
        while chunk := src.read(_CHUNK):
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"file is larger than the {limit}-byte limit")
            out.write(chunk)


def validate_jsonl(path: Path) -> tuple[int, list[str]]:
    """Rows and the scalar fields that every row has; BadRequest naming the first bad line."""
    rows = 0
    common: set[str] | None = None
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise BadRequest(f"line {number} is not valid UTF-8", {"line": number}) from None
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadRequest(
                    f"line {number} is not valid JSON: {exc.msg} (column {exc.colno})",
                    {"line": number},
                ) from None
            except ValueError as exc:  # a number past Python's digit limit
                problem = f"line {number} is not usable JSON: {exc}"
                raise BadRequest(problem, {"line": number}) from None
            except RecursionError:
                raise BadRequest(f"line {number} nests too deeply", {"line": number}) from None
            if not isinstance(row, dict):
                raise BadRequest(
                    f"line {number} must be a JSON object, got {type(row).__name__}",
                    {"line": number},
                )
            if has_nul(row):
                raise BadRequest(
                    f"line {number} holds the NUL character (\\u0000), which the database "
                    "cannot store",
                    {"line": number},
                )
            if is_chat(row) and (problem := chat_problem(row)):
                raise BadRequest(f"line {number} is not a chat row: {problem}", {"line": number})
            keys = set(scalar_fields(row)) | ({"messages"} if is_chat(row) else set())
            common = keys if common is None else common & keys
            rows += 1
    if rows == 0:
        raise BadRequest("file has no rows: expected one JSON object per line")
    return rows, sorted(common or ())


def create_file(
    session: Session,
    settings: Settings,
    project: Project,
    src: BinaryIO,
    filename: str | None,
    purpose: str,
) -> File:
    if purpose not in PURPOSES:
        raise BadRequest(f"purpose must be one of {', '.join(PURPOSES)}; got {purpose!r}")
    if filename and (len(filename) > MAX_FILENAME or "\x00" in filename):
        raise BadRequest(
            f"the file's name must be at most {MAX_FILENAME} characters, without NUL; "
            f"got {len(filename)} characters"
        )
    file_id, dest = _new_path(settings)
    try:
        _copy_limited(src, dest, settings.max_upload_bytes)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return _record(session, project.id, file_id, dest, filename or f"{file_id}.jsonl", purpose)


def _new_path(settings: Settings) -> tuple[str, Path]:
    settings.files_dir.mkdir(parents=True, exist_ok=True)
    file_id = new_id("file")
    return file_id, settings.files_dir / f"{file_id}.jsonl"


def _record(
    session: Session, project_id: str, file_id: str, dest: Path, filename: str, purpose: str
) -> File:
    """Check the JSONL at `dest` line by line (removed when bad) and record it."""
    try:
        rows, fields = validate_jsonl(dest)
        if purpose == FilePurpose.OFFPOLICY:
            _validate_groups(numbered_rows(dest))
        elif purpose == FilePurpose.FINE_TUNE:
            _validate_fine_tune(numbered_rows(dest))
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    row = File(
        id=file_id,
        project_id=project_id,
        filename=filename,
        purpose=purpose,
        bytes=dest.stat().st_size,
        rows=rows,
        fields=fields,
        path=str(dest),
    )
    session.add(row)
    session.flush()
    return row


def _validate_groups(rows: list[tuple[int, dict]]) -> None:
    """BadRequest naming the first line that is not a valid off-policy group."""
    for number, row in rows:
        if problem := group_problem(row):
            raise BadRequest(
                f"line {number} is not an off-policy group: {problem}", {"line": number}
            )


def _validate_fine_tune(rows: list[tuple[int, dict]]) -> None:
    """BadRequest naming the first line that is not a fine-tuning prompt row."""
    for number, row in rows:
        if problem := fine_tune_problem(row):
            raise BadRequest(f"line {number} of a fine-tune file {problem}", {"line": number})


def get_file(session: Session, project: Project, file_id: str) -> File:
    row = session.get(File, file_id)
    if row is None or row.project_id != project.id:
        raise NotFound(f"no file {file_id!r} in this project")
    return row


def list_files(session: Session, project: Project) -> list[File]:
    stmt = select(File).where(File.project_id == project.id).order_by(File.id.desc())
    return list(session.scalars(stmt))
