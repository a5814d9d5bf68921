"""Serving our own models, the parts that the API (service/serving) and a worker's judge
(workers/graders/served.py) share: which weights a run's id stands for, given its row's data;
which inference worker to ask for a model; and the control request an inference worker takes
(workers/serving/worker.py) and what it answers. Each side reads its own rows; the rules are
here, once.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from service.contract import storage
from service.contract.states import TERMINAL, RunStatus

NO_WORKER = (
    "no inference worker is running to serve models: start one with `gvpo serve` (the "
    "embedded stack runs one unless GVPO_SERVE_IN_STACK is false)"
)


class Unservable(Exception):
    """Why a model cannot be served: `not_found` (404: no such model in the project),
    `conflict` (409: nothing to serve yet, and why), `gone` (410: its files are gone)."""

    def __init__(self, kind: Literal["not_found", "conflict", "gone"], message: str) -> None:
        super().__init__(message)
        self.kind, self.message = kind, message


def unknown(name: str) -> Unservable:
    return Unservable(
        "not_found",
        f"no model {name!r} in this project: a model is one of its checkpoints (ckpt_…) or "
        "runs (run_…); GET /v1/models lists them",
    )


def checkpoint_gone(name: str, run_id: str) -> Unservable:
    return Unservable(
        "gone",
        f"checkpoint {name}'s files are gone (checkpoint.keep_last removed them, or they "
        f"were deleted): serve a newer checkpoint of run {run_id}, or the run itself",
    )


def wants_asking(status: str, asked: bool, publishing: Callable[[], bool]) -> bool:
    """Whether serving the run should note that its model is wanted (from then on it publishes
    its weights): not yet noted, the run not ended, and it publishes at all."""
    return not asked and status not in TERMINAL and publishing()


@dataclass(frozen=True)
class RunWeights:
    """What a run's id serves: its checkpoint `checkpoint` (an id), or the weights it
    published at `path`, of `step`."""

    checkpoint: str | None = None
    path: str | None = None
    step: int = 0


def run_weights(
    name: str,
    status: str,
    publishing: Callable[[], bool],
    weights_path: str | None,
    weights_step: int | None,
    newest_checkpoint: tuple[str, int] | None,
) -> RunWeights:
    """The run's newest weights: those it published, or its newest checkpoint (id, step) when
    that is newer. Unservable (409 or 410) when it has none. `publishing`: whether the run
    publishes weights at all (read only when it matters: it parses the run's spec)."""
    if newest_checkpoint is not None and (
        weights_step is None or newest_checkpoint[1] > weights_step
    ):
        return RunWeights(checkpoint=newest_checkpoint[0], step=newest_checkpoint[1])
    if weights_path is None:
        if not publishing():
            raise Unservable(
                "conflict",
                f"run {name} publishes no weights (its serving.sync_every_steps is 0) and has "
                "no checkpoint yet: serve it once it has one",
            )
        if status == RunStatus.QUEUED:
            raise Unservable(
                "conflict", f"run {name} has not started: it has no weights to serve yet"
            )
        if status in TERMINAL:
            raise Unservable(
                "conflict", f"run {name} has no weights to serve (it stopped before it had any)"
            )
        raise Unservable(
            "conflict",
            f"run {name} publishes its weights at the end of its current step (asked for "
            "now): try again then",
        )
    if not storage.is_remote(weights_path) and not Path(weights_path).is_dir():
        raise Unservable(
            "gone", f"the weights run {name} published are gone (its data was deleted)"
        )
    return RunWeights(path=weights_path, step=weights_step or 0)


# ---------------------------------------------------------------- inference workers


@dataclass(frozen=True)
class LiveWorker:
    """An inference worker, as its row (inference_workers) says."""

    url: str  # its control server
    holds: dict[str, int]  # model -> version
    free: int  # bytes

    @classmethod
    def of_row(cls, url: str, models: list[dict[str, Any]], memory_bytes: int) -> "LiveWorker":
        return cls(
            url,
            {m["model"]: m["version"] for m in models},
            memory_bytes - sum(m["bytes"] for m in models),
        )


def by_preference(workers: list[LiveWorker], model: str) -> list[LiveWorker]:
    """Whom to ask for `model`, in order: those holding it first (the newest version first),
    then the most memory free."""
    return sorted(workers, key=lambda w: (model not in w.holds, -w.holds.get(model, 0), -w.free))


class EnsureModel(BaseModel):
    """POST /models to an inference worker: serve `model` from `path` at `version` or newer
    (loading, reloading or restarting it)."""

    model: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    path: str = Field(min_length=1, max_length=1024)
    version: int = Field(0, ge=0)


@dataclass(frozen=True)
class Held:
    """An inference worker's 200 to EnsureModel: its vLLM server for the model."""

    url: str
    version: int


@dataclass(frozen=True)
class Refusal:
    """An inference worker's answer other than 200: `gone` (410: the model's files are gone),
    `broken` (502: it did not load), or `no_room` (another worker may have some)."""

    kind: Literal["gone", "broken", "no_room"]
    message: str


def ensure_outcome(status: int, body: Any) -> Held | Refusal:
    """What an inference worker's answer to EnsureModel means."""
    if status == 200:
        return Held(body["url"], body["version"])
    try:
        message = body["error"]["message"]
    except (KeyError, TypeError):
        message = f"the inference worker answered {status}"
    kind = {410: "gone", 502: "broken"}.get(status, "no_room")
    return Refusal(kind, message)  # type: ignore[arg-type]
