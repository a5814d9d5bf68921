"""Weights & Biases: the run's metrics (history, at the run's steps), its spec (the W&B run's
config) and checkpoints (artifacts of type model, aliased step-N and latest).

The W&B run's id is the service's run id, so an attempt that resumes the run after a worker
died goes on with the same W&B run (resume="allow"). Offline, the run's files are written
under the run's folder (<data dir>/runs/<run>/wandb/offline-run-*), for `wandb sync`; online,
the worker's WANDB_API_KEY (and WANDB_BASE_URL for a W&B server of one's own) are used.
"""

from pathlib import Path
from typing import Any

from service.contract.states import RunStatus
from workers.tracking.base import RunInfo, optional_module

INIT_TIMEOUT_S = 60.0
EXIT_CODES = {RunStatus.SUCCEEDED: 0, RunStatus.FAILED: 1, RunStatus.CANCELLED: 1}


def _within(path: Path, run: RunInfo) -> str:
    """`path` relative to the run's folder (events show no worker's paths)."""
    try:
        return str(path.relative_to(run.folder))
    except ValueError:
        return path.name


class WandbSink:
    name = "wandb"

    def __init__(self, spec) -> None:
        """`spec`: the run's tracking.wandb (service/contract/tracking.py WandbTracking)."""
        self.spec = spec
        self.checkpoints = spec.checkpoints
        self.run = None
        self.logged = None  # offline, W&B cannot be asked

    def metric_key(self, name: str) -> str:
        return name

    def start(self, run: RunInfo) -> dict[str, Any]:
        self.wandb = wandb = optional_module("wandb")
        run.folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.spec.project,
            entity=self.spec.entity,
            mode=self.spec.mode,
            id=run.run_id,
            name=self.spec.run_name or run.name,
            resume="allow",
            config=run.spec,
            dir=str(run.folder),
            reinit="create_new",  # a worker process runs one run after another
            settings=wandb.Settings(
                silent=True,
                console="off",  # the worker's own output is not the run's
                save_code=False,
                disable_git=True,
                x_disable_stats=True,
                init_timeout=INIT_TIMEOUT_S,
            ),
        )
        files = Path(self.run.dir).parent  # offline-run-<time>-<id>, within the run's folder
        return {"run_id": self.run.id, "mode": self.spec.mode, "folder": _within(files, run)}

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def log_checkpoint(self, step: int, folder: Path) -> None:
        artifact = self.wandb.Artifact(
            f"{self.run.id}-model", type="model", metadata={"step": step}
        )
        artifact.add_dir(str(folder))
        self.run.log_artifact(artifact, aliases=[f"step-{step}", "latest"])

    def finish(self, status: RunStatus | None) -> None:
        if self.run is not None:
            # A run that is only paused (or went to another worker) finishes cleanly here and
            # is resumed by the next attempt.
            self.run.finish(exit_code=EXIT_CODES.get(status, 0))
            self.run = None
