"""The run spec's `tracking` section: experiment trackers that a run's metrics, spec and
checkpoints are copied to as it trains (workers/tracking/), beside the service's own records.

A tracker is a copy, never the record: the run's metrics stay in the service, and a tracker
that fails (down, refusing, not installed on the worker) costs the run a `tracking.failed`
warning event, never the run. Credentials come from the worker's environment
(MLFLOW_TRACKING_TOKEN, WANDB_API_KEY, ...), never from the spec, which is stored and shown.
"""

from typing import Literal

from pydantic import Field

from service.contract.limits import Strict

# W&B refuses these characters in project and entity names.
_WANDB_NAME = r"^[^/\\#?%:]+$"


class MlflowTracking(Strict):
    uri: str = Field(
        min_length=1,
        max_length=2000,
        description="the MLflow tracking server's http(s) URL (checked at submission like a "
        "webhook URL; credentials from the worker's MLFLOW_TRACKING_TOKEN or "
        "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)",
    )
    experiment: str = Field(
        "gvpo",
        min_length=1,
        max_length=500,
        description="the experiment's name; made when the server has none by that name",
    )
    run_name: str | None = Field(
        None, min_length=1, max_length=250, description="default: the run's name, else its id"
    )
    checkpoints: bool = Field(
        True, description="upload each checkpoint folder as artifacts (checkpoints/step_NNNNNN)"
    )


class WandbTracking(Strict):
    project: str = Field(min_length=1, max_length=128, pattern=_WANDB_NAME)
    entity: str | None = Field(None, min_length=1, max_length=128, pattern=_WANDB_NAME)
    mode: Literal["offline", "online"] = Field(
        "offline",
        description="offline: files in the run's folder on the worker (<data dir>/runs/<run>/"
        "wandb), for `wandb sync`; online: to W&B (the worker's WANDB_API_KEY and "
        "WANDB_BASE_URL)",
    )
    run_name: str | None = Field(
        None, min_length=1, max_length=250, description="default: the run's name, else its id"
    )
    checkpoints: bool = Field(True, description="log each checkpoint as an artifact of type model")


class TrackingSpec(Strict):
    mlflow: MlflowTracking | None = Field(None, description="an MLflow tracking server")
    wandb: WandbTracking | None = Field(None, description="Weights & Biases")
    tensorboard: bool = Field(
        False,
        description="TensorBoard event files of every metric in the run's checkpoint folder on "
        "the worker (<data dir>/runs/<run>/checkpoints/tensorboard)",
    )

    @property
    def any(self) -> bool:
        return bool(self.mlflow or self.wandb or self.tensorboard)


# The names trackers go by in `tracking.failed` events (data.tracker).
TRACKERS = ("mlflow", "wandb", "tensorboard")
