"""What the tests build and wait for (import with `from factories import ...`): datasets, run
specs, uploads over HTTP, runs created through the service layer, and `wait_until`, the one way
a test waits for something to happen."""

import copy
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from service.auth.service import create_api_key
from service.contract.spec import RunSpec
from service.db import session_scope
from service.files.service import create_file
from service.runs.service import create_run

T = TypeVar("T")

# Deadlines for a machine under load (other test runs, a 2-core CI box): a wait only takes
# long when something is wrong, so they are generous.
SERVER_START_S = 30.0  # a server we started answers
WORKER_S = 120.0  # a worker gets somewhere in a run (model load, a few steps)


# ---------------------------------------------------------------- waiting


def wait_until(
    check: Callable[[], T], timeout: float = 60.0, what: str = "the condition", every: float = 0.05
) -> T:
    """Call `check` until it returns something truthy, and return that; fail (AssertionError
    naming `what` and the last value seen) once `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f} s waiting for {what}; last seen: {value!r}"
            )
        time.sleep(every)


def wait_for_run(http, run_id: str, statuses: set[str], timeout: float = 180.0) -> dict:
    """GET the run until its status is one of `statuses`; returns it."""
    last: dict = {}

    def reached() -> dict | None:
        last.update(http.get(f"/v1/runs/{run_id}").json())
        return dict(last) if last["status"] in statuses else None

    try:
        return wait_until(
            reached, timeout, f"run {run_id} to be {' or '.join(sorted(statuses))}", every=0.3
        )
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}: it stayed {last.get('status')} (step {last.get('step')}, "
            f"error {last.get('error')!r})"
        ) from None


# ---------------------------------------------------------------- data


def copy_rows(n: int = 64) -> list[dict]:
    """The demo's task: copy a 3-letter string."""
    import random

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(3)) for _ in range(n)]
    return [{"prompt": f"{w}=", "answer": w} for w in words]


def jsonl(rows: list) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_bytes(jsonl(rows))
    return path


# ---------------------------------------------------------------- run specs

DROP = object()  # in run_spec() changes: remove this key
EXACT_MATCH = {"type": "builtin", "name": "exact_match"}
# DESIGN.md's standard metric names: every step records each of them.
STANDARD_METRICS = (
    "reward/mean",
    "reward/std",
    "loss",
    "kl/ref",
    "logratio/mean",
    "entropy",
    "response_length/mean",
    "grad_norm",
    "lr",
    "time/rollout_s",
    "time/reward_s",
    "time/learn_s",
    "throughput/tokens_per_s",
)

# The copy task at a size that trains in seconds on a CPU.
COPY_TASK = {
    "reward": {"type": "builtin", "name": "char_accuracy"},
    "algorithm": {"group_size": 4, "beta": 0.05},
    "sampling": {"max_new_tokens": 5},
    "optimizer": {"lr": 1e-3},
    "training": {"steps": 6, "prompts_per_step": 2, "mini_batches": 2},
}


def _changed(base: dict, changes: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if value is DROP:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict) and key != "reward":
            out[key] = _changed(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def run_spec(model_path, train_file: str, *layers: dict, **sections) -> dict:
    """A run spec (the JSON body of POST /v1/runs) for the copy task (COPY_TASK) on
    `model_path` and `train_file`.

    Each layer (a dict of sections), then the keyword sections, change it in turn: a dict
    merges into the section it names, key by key and at any depth (DROP removes a key or a
    whole section); `reward`, one of several kinds, and any other value replace what was there.
    """
    spec = {
        "model": {"path": str(model_path)},
        "dataset": {"train_file": train_file},
        **copy.deepcopy(COPY_TASK),
    }
    for changes in (*layers, sections):
        spec = _changed(spec, changes)
    return spec


# How submit() changes the copy task: the reference is the starting model, rollouts use
# transformers (the run loop's own tests; vLLM runs get their own module, with one engine start
# there instead of one per test) and a checkpoint every 3 steps.
SUBMITTED = {
    "algorithm": {"reference": "initial"},
    "rollout": {"engine": "hf"},
    "checkpoint": {"every_steps": 3, "keep_last": 1},
}


# A user's shortest spec: the spec's own algorithm, optimizer and training defaults, and 16
# new tokens (within the tiny model's context). For tests that only submit a run.
SPEC_DEFAULTS = {
    "algorithm": DROP,
    "optimizer": DROP,
    "training": DROP,
    "sampling": {"max_new_tokens": 16},
}

# How the end-to-end tests (a worker process of the embedded stack) change the copy task: 8
# steps of 4 prompts, a checkpoint every 4, the starting model as the reference.
STACK_RUN = {
    "algorithm": {"reference": "initial"},
    "training": {"steps": 8, "prompts_per_step": 4},
    "checkpoint": {"every_steps": 4},
}


def submit(
    settings,
    model_path,
    reward: dict | None = None,
    eval_rows: list | None = None,
    offpolicy_rows: list | None = None,
    train_rows: list | None = None,
    project_name: str = "loop",
    **sections,
) -> str:
    """A queued run of project `project_name` on 32 rows of the copy task, created straight through
    the service layer; returns its id. The spec is run_spec(..., SUBMITTED, **sections), with
    `reward` in place of char_accuracy when given. `eval_rows`, `offpolicy_rows`: uploaded as
    the run's dataset.eval_file / offpolicy_file; `train_rows` instead of the copy task's."""
    with session_scope(settings.resolved_database_url) as session:
        project, _ = create_api_key(session, project_name, settings.api_key_pepper)

        def stored(rows: list, purpose: str, name: str) -> str:
            return create_file(
                session, settings, project, io.BytesIO(jsonl(rows)), name, purpose
            ).id

        train_file = stored(train_rows or copy_rows(32), "train", "train.jsonl")
        files = {
            f"{purpose}_file": stored(rows, purpose, f"{purpose}.jsonl")
            for rows, purpose in ((eval_rows, "eval"), (offpolicy_rows, "offpolicy"))
            if rows is not None
        }
        spec = run_spec(
            model_path,
            train_file,
            SUBMITTED,
            {"reward": reward} if reward else {},
            sections,
            {"dataset": files},
        )
        run, _ = create_run(session, settings, project, RunSpec.model_validate(spec), None)
        return run.id


def webhook_secret(settings, run_id: str) -> str:
    """A run's webhook secret in clear (the database keeps it encrypted)."""
    from service.models import Run

    with session_scope(settings.resolved_database_url) as session:
        stored = session.get(Run, run_id).webhook_secret_encrypted
    return settings.sealer.open(stored)


# ---------------------------------------------------------------- HTTP


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def post_file(
    client,
    key: str | None,
    content: list | bytes,
    purpose: str = "train",
    filename: str = "train.jsonl",
):
    """POST /v1/files with `content` (rows, sent as JSONL, or the file's bytes); the response.
    `client`: a TestClient or an httpx.Client; key None: the client's own headers."""
    data = content if isinstance(content, bytes) else jsonl(content)
    return client.post(
        "/v1/files",
        headers=auth(key) if key else {},
        files={"file": (filename, data)},
        data={"purpose": purpose},
    )


def upload(
    client,
    key: str | None,
    content: list | bytes,
    purpose: str = "train",
    filename: str = "train.jsonl",
) -> str:
    """post_file(), which must succeed; the new file's id."""
    resp = post_file(client, key, content, purpose, filename)
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


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
    return [run_id for run_id, _task_id in broker_messages(settings, queue)]


def broker_messages(settings, queue: str = "default") -> list[tuple[str, str]]:
    """(run id, task id) of the task messages waiting in the broker (see broker_run_ids)."""
    import base64

    if settings.broker_url.startswith("redis"):
        import redis

        # kombu pushes on the left and pops on the right
        raw = reversed(redis.Redis.from_url(settings.broker_url).lrange(queue, 0, -1))
    else:
        raw = (m.read_text() for m in sorted((settings.broker_dir / "queue").glob("*.msg")))
    messages = []
    for message in raw:
        envelope = json.loads(message)
        args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        messages.append((args[0], envelope["headers"]["id"]))
    return messages


def take_message(settings, queue: str = "default") -> tuple[str, str] | None:
    """Take the next task message from the broker's `queue` as a worker would, through kombu:
    (run id, task id); None when the queue is empty."""
    import base64
    from queue import Empty

    from service.contract.tasks import celery_app

    with celery_app(settings).connection_for_read() as conn:
        try:
            envelope = conn.default_channel._get(queue)
        except Empty:
            return None
    args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
    return args[0], envelope["headers"]["id"]


# ---------------------------------------------------------------- models


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


# ---------------------------------------------------------------- recorded episodes

# A multi-turn run (DESIGN.md §v2.1) whose steps a test writes as its worker would, rather than
# trains: on a queue no worker reads.
TOOL_RUN = {
    "environment": {"type": "builtin", "name": "python_tool", "max_turns": 2},
    "resources": {"queue": "parked"},
}
EPISODE_METRICS = ("episode/turns_mean", "episode/truncated_frac", "time/environment_s")


def _call(call_id: str, code: str) -> dict:
    arguments = json.dumps({"code": code})
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": "python", "arguments": arguments},
    }


def tool_episodes() -> list[dict]:
    """One group's samples as workers/step_metrics.py records them: an episode the environment
    ended after a tool call and its answer, one cut at max_turns, one at max_episode_tokens."""
    call = {"role": "assistant", "content": "", "tool_calls": [_call("call_0", "print(6 * 7)")]}
    answer = {"role": "tool", "content": "42\n", "tool_call_id": "call_0"}
    episodes = [
        ([(call, 21), (answer, 11), ({"role": "assistant", "content": "6 * 7 = 42"}, 8)], "done"),
        ([(call, 21), (answer, 11), (call, 21)], "max_turns"),
        ([({"role": "assistant", "content": "Let me think. " * 9}, 64)], "max_episode_tokens"),
    ]
    samples = []
    for i, (turns, end) in enumerate(episodes):
        shown = [
            {"tool_calls": None, "tool_call_id": None, **message}
            | {"tokens": n, "trained": message["role"] == "assistant"}
            for message, n in turns
        ]
        samples.append(
            {
                "group_index": 0,
                "sample_index": i,
                "prompt": "<|user|>What is 6 * 7? Use python.<|assistant|>",
                "completion": turns[-1][0]["content"],
                "answer": "42",
                "reward": float(end == "done"),
                "episode": {
                    "prompt_messages": [{"role": "user", "content": "What is 6 * 7? Use python."}],
                    "turns": shown,
                    "end": end,
                    "trained_tokens": sum(t["tokens"] for t in shown if t["trained"]),
                    "tokens": sum(t["tokens"] for t in shown),
                },
            }
        )
    return samples


def record_episode_steps(settings, run_id: str, steps: int, episodes: bool = True) -> None:
    """Claim the run, record `steps` steps of tool_episodes() and their metrics through the
    worker's recorder, and end it succeeded. episodes=False: the same samples as single
    completions (no `episode`), as a run without an environment records them."""
    from service.contract.states import RunStatus
    from workers.records import RunRecorder

    recorder = RunRecorder(settings, run_id, "worker-episodes")
    assert recorder.claim()[0] is not None
    samples = tool_episodes()
    tokens = sum(s["episode"]["trained_tokens"] for s in samples)
    extra = dict(zip(EPISODE_METRICS, (5 / 3, 2 / 3, 0.2), strict=True))
    if not episodes:
        samples, extra = [{**s, "episode": None} for s in samples], {}
    for step in range(1, steps + 1):
        metrics = {"reward/mean": 1 / 3, "loss": 0.1 / step, "kl/ref": 0.01 * step, **extra}
        recorder.record_step(step, metrics, samples, tokens)
    recorder.finish(RunStatus.SUCCEEDED, f"run succeeded after {steps} steps")
