"""Small helpers shared by the tests (import with `from helpers import ...`)."""

import io
import json
from pathlib import Path

from service.auth.service import create_api_key
from service.db import session_scope
from service.files.service import create_file
from service.runs.service import create_run
from service.contract.spec import RunSpec


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def copy_rows(n: int = 64) -> list[dict]:
    """The demo's task: copy a 3-letter string."""
    import random

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(3)) for _ in range(n)]
    return [{"prompt": f"{w}=", "answer": w} for w in words]


def jsonl(rows: list) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


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


def broker_run_ids(settings, queue: str = "default") -> list[str]:
    """Run ids of the task messages waiting in the broker: the filesystem broker's queue
    folder (every queue), or the Redis list of `queue`, oldest first."""
    import base64

    if settings.broker_url.startswith("redis"):
        import redis

        # kombu pushes on the left and pops on the right
        raw = reversed(redis.Redis.from_url(settings.broker_url).lrange(queue, 0, -1))
    else:
        raw = (m.read_text() for m in sorted((settings.broker_dir / "queue").glob("*.msg")))
    ids = []
    for message in raw:
        args, _kwargs, _embed = json.loads(base64.b64decode(json.loads(message)["body"]))
        ids.append(args[0])
    return ids


def submit(settings, model_path, reward: dict | None = None, eval_rows: list | None = None,
           offpolicy_rows: list | None = None, **overrides) -> str:
    """Create a queued run on the copy task straight through the service layer; returns its id.

    A dict override merges into its section; any other value sets a top-level field.
    `eval_rows`, `offpolicy_rows`: uploaded as the run's dataset.eval_file / offpolicy_file."""
    data = jsonl(copy_rows(32))
    spec = {
        "model": {"path": str(model_path)},
        "reward": reward or {"type": "builtin", "name": "char_accuracy"},
        "algorithm": {"group_size": 4, "beta": 0.05, "reference": "initial"},
        "sampling": {"max_new_tokens": 5},
        # The run loop's own tests use transformers; vLLM runs get their own module (one engine
        # start there instead of one per test) and the worker end-to-end tests use `auto`.
        "rollout": {"engine": "hf"},
        "optimizer": {"lr": 1e-3},
        "training": {"steps": 6, "prompts_per_step": 2, "mini_batches": 2},
        "checkpoint": {"every_steps": 3, "keep_last": 1},
    }
    for section, values in overrides.items():
        spec[section] = {**spec.get(section, {}), **values} if isinstance(values, dict) else values
    with session_scope(settings.resolved_database_url) as session:
        project, _ = create_api_key(session, "loop", settings.api_key_pepper)
        file = create_file(session, settings, project, io.BytesIO(data), "copy.jsonl", "train")
        spec["dataset"] = {**spec.get("dataset", {}), "train_file": file.id}
        for rows, kind in ((eval_rows, "eval"), (offpolicy_rows, "offpolicy")):
            if rows is not None:
                extra = create_file(session, settings, project, io.BytesIO(jsonl(rows)),
                                    f"{kind}.jsonl", kind)
                spec["dataset"][f"{kind}_file"] = extra.id
        run, _ = create_run(session, settings, project, RunSpec.model_validate(spec), None)
        return run.id


def set_constant_logits(model, logits) -> None:
    """Rewrite a tiny Llama's weights so that every position's next-token logits are `logits`:
    the residual stream becomes the constant unit vector e0 (embeddings = e0, attention and MLP
    outputs zeroed), and the LM head reads only that direction."""
    import torch

    with torch.no_grad():
        inner = model.get_base_model().model if hasattr(model, "peft_config") else model.model
        inner.embed_tokens.weight.zero_()
        inner.embed_tokens.weight[:, 0] = 1.0
        for layer in inner.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        inner.norm.weight.fill_(1.0)
        head = model.get_output_embeddings().weight
        head.zero_()
        head[:, 0] = logits / head.shape[1] ** 0.5  # RMSNorm scales e0 to sqrt(hidden)
