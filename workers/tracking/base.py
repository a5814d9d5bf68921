"""What every tracker sink is: one backend (MLflow, W&B, TensorBoard) behind one interface,
called by the run's tracking session (session.py) on its own thread, never by the run loop.

A sink may raise anything from any method: the session turns it into a `tracking.failed`
warning event and drops the sink for the rest of the attempt. A sink imports its library in
`start`, so a worker without it fails that tracker only.
"""

import importlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from service.contract.states import RunStatus


class TrackerError(Exception):
    """A tracker's refusal or outage, said for the run's event log."""


@dataclass(frozen=True)
class RunInfo:
    """What a sink knows of the run it tracks."""

    run_id: str
    name: str  # the spec's name, else the run's id
    spec: dict[str, Any]  # the run's stored spec: what the API shows, every default filled in
    folder: Path  # the run's folder on this worker (<data dir>/runs/<run>)
    resumed: bool  # an earlier attempt recorded steps: go on with the same tracker run


class Sink(Protocol):
    name: str  # mlflow | wandb | tensorboard (service/contract/tracking.py TRACKERS)
    checkpoints: bool  # whether it wants log_checkpoint calls
    # After start, when the tracker can tell: metric name -> the last step it has of it (a
    # run that goes on); None: it cannot, and the run's own records say (session.py).
    logged: dict[str, int] | None

    def metric_key(self, name: str) -> str:
        """The name the tracker keeps metric `name` by (in `logged`)."""

    def start(self, run: RunInfo) -> dict[str, Any]:
        """Open (or, resumed, reopen) the tracker's run and log the spec; returns what the
        `tracking.started` event says of it (its id, a link)."""

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...

    def log_checkpoint(self, step: int, folder: Path) -> None:
        """`folder`: a copy of the checkpoint that stays until this returns."""

    def finish(self, status: RunStatus | None) -> None:
        """Close the tracker's run: as `status` when the run ended, else (paused, lease lost,
        stopped) left open for the attempt that goes on with it."""


_NOT_IN_A_NAME = re.compile(r"[^-/\w.]")


def optional_module(name: str):
    """The tracker's library, imported when a run asks for it; TrackerError when the worker
    was installed without it."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise TrackerError(
            f"{name} is not installed on the worker ({exc}): pip install 'gvpo-service[tracking]'"
        ) from None


def tracker_name(name: str) -> str:
    """A metric's name as MLflow and TensorBoard take it (letters, digits and _ - . /):
    eval/pass@1 -> eval/pass_at_1. W&B takes every name as it is."""
    return _NOT_IN_A_NAME.sub("_", name.replace("@", "_at_"))


def flatten(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, leaf) of a nested dict: {"a": {"b": 1}} -> ("a.b", 1). Lists are leaves."""
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def as_text(value: Any) -> str:
    """A spec leaf as a parameter's text: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)
