"""TensorBoard: every metric of the run as scalars, in event files in the run's checkpoint
folder on the worker (<data dir>/runs/<run>/checkpoints/tensorboard): `tensorboard --logdir`
there. Written with tensorboardX (no TensorFlow); an attempt that resumes the run adds an
event file of its own to the same folder, and TensorBoard shows them as one series.
"""

from pathlib import Path
from typing import Any

from service.contract.states import RunStatus
from workers.tracking.base import RunInfo, optional_module, tracker_name


def tensorboard_dir(run_folder: Path) -> Path:
    return run_folder / "checkpoints" / "tensorboard"


class TensorBoardSink:
    name = "tensorboard"
    checkpoints = False  # scalars only: the checkpoints are the run's own
    logged = None

    def __init__(self) -> None:
        self.writer = None

    def metric_key(self, name: str) -> str:
        return tracker_name(name)

    def start(self, run: RunInfo) -> dict[str, Any]:
        writer = optional_module("tensorboardX").SummaryWriter
        folder = tensorboard_dir(run.folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.writer = writer(logdir=str(folder), flush_secs=30)
        return {"folder": str(folder.relative_to(run.folder))}  # within the run's folder

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(tracker_name(name), float(value), global_step=step)
        self.writer.flush()

    def log_checkpoint(self, step: int, folder: Path) -> None:
        pass

    def finish(self, status: RunStatus | None) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
