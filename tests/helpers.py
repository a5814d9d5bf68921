"""Small helpers shared by the tests (import with `from helpers import ...`)."""

import json
from pathlib import Path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def copy_rows(n: int = 64) -> list[dict]:
    """The demo's task: copy a 3-letter string."""
    import random

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(3)) for _ in range(n)]
    return [{"prompt": f"{w}=", "answer": w} for w in words]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_error(resp, status: int, code: str, *needles: str) -> dict:
    """The response is a JSON error {"error": {"code", "message", "details"}} whose message
    contains every needle; returns the error object."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "details"}, error
    assert error["code"] == code, error
    assert isinstance(error["details"], dict), error
    for needle in needles:
        assert needle in error["message"], (needle, error["message"])
    return error


def broker_run_ids(settings) -> list[str]:
    """Run ids of the task messages waiting in the filesystem broker's queue folder."""
    import base64

    ids = []
    for msg in sorted((settings.broker_dir / "queue").glob("*.msg")):
        envelope = json.loads(msg.read_text())
        args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        ids.append(args[0])
    return ids
