"""One attempt's tracking session: the sinks a run's spec names, fed on a thread of their own,
so that a slow or dead tracker never holds up a step.

The run's recorder hands over every metric it records (a step's, and an evaluation's after
it) and each checkpoint folder it writes; the session sends them on in order. Whatever a sink
raises becomes a `tracking.failed` warning event naming the tracker and the error, and that
sink is dropped for the rest of the attempt: the run goes on, and its own records are whole.

An attempt that resumes the run replays the steps after its checkpoint: a metric goes to a
tracker only at a step past the last one that tracker has of it. A sink that can ask its
tracker says (`logged` after start: MLflow's latest step of each metric); for the others, the
last step the run had recorded of each metric when the attempt began (the database says,
wherever the earlier attempt ran). So no tracker sees a step twice.
"""

import logging
import os
import queue
import shutil
import threading
from pathlib import Path
from typing import Any

from service.config import Settings
from service.contract.events import EventLevel, EventType
from service.contract.spec import RunSpec
from service.contract.states import RunStatus
from workers.tracking.base import RunInfo, Sink
from workers.tracking.mlflow_sink import MlflowSink
from workers.tracking.tensorboard_sink import TensorBoardSink
from workers.tracking.wandb_sink import WandbSink

log = logging.getLogger(__name__)

CLOSE_S = 120.0  # how long the end of an attempt waits for the trackers to take the rest
MAX_STAGED = 2  # checkpoints waiting for the trackers; past it a checkpoint is not sent


def sinks_of(settings: Settings, spec: RunSpec) -> list[Sink]:
    tracking = spec.tracking
    if tracking is None:
        return []
    sinks: list[Sink] = []
    if tracking.mlflow is not None:
        sinks.append(MlflowSink(tracking.mlflow, settings.webhook_allow_private))
    if tracking.wandb is not None:
        sinks.append(WandbSink(tracking.wandb))
    if tracking.tensorboard:
        sinks.append(TensorBoardSink())
    return sinks


class Tracking:
    """Started by `start_tracking`; the recorder calls log_metrics and log_checkpoint, and
    the attempt's end calls close."""

    def __init__(self, recorder, sinks: list[Sink], run: RunInfo, recorded: dict[str, int]) -> None:
        self.recorder, self.sinks, self.run = recorder, sinks, run
        self.recorded = recorded  # metric name -> the last step recorded before the attempt
        # per sink: metric name -> the last step it has
        self.logged: dict[str, dict[str, int]] = {}
        self.jobs: queue.Queue = queue.Queue()
        self.staged = 0
        self.lock = threading.Lock()
        self.thread = threading.Thread(
            target=self._work, name=f"tracking-{run.run_id}", daemon=True
        )

    # -- the run's side (the thread that records) ------------------------------------------

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.jobs.put(("metrics", step, {k: float(v) for k, v in metrics.items()}))

    def log_checkpoint(self, step: int, folder: Path) -> None:
        """Send the checkpoint written at `folder`: a copy of it (hard links where the disk
        allows) is staged first, since the run may remove or upload-and-delete the folder
        before a tracker has read it."""
        if not any(s.checkpoints for s in self.sinks):
            return
        with self.lock:
            if self.staged >= MAX_STAGED:
                log.warning("run %s: trackers busy; checkpoint %d not sent", self.run.run_id, step)
                return
            self.staged += 1
        staged = self.run.folder / "tracking" / "staged" / folder.name
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(folder, staged, copy_function=_link)
        self.jobs.put(("checkpoint", step, staged))

    def close(self, status: RunStatus | None) -> None:
        """End the attempt: the trackers' runs close as `status` says (None: left open for
        the next attempt), waiting at most CLOSE_S for what is still to send."""
        self.jobs.put(("finish", status))
        self.thread.join(CLOSE_S)
        if self.thread.is_alive():
            busy = ", ".join(s.name for s in self.sinks)
            self._event(
                EventType.TRACKING_FAILED,
                f"tracking: {busy} still busy {CLOSE_S:g} s after the run stopped; what was "
                "left to send is dropped",
                EventLevel.WARNING,
                {"tracker": busy, "during": "finish", "error": "timed out"},
            )

    # -- the session's thread --------------------------------------------------------------

    def _work(self) -> None:
        for sink in list(self.sinks):
            if (info := self._call(sink, "start", sink.start, self.run)) is not None:
                self._event(
                    EventType.TRACKING_STARTED,
                    f"tracking with {sink.name}" + (f": {info['url']}" if info.get("url") else ""),
                    data={"tracker": sink.name, **info},
                )
                known = sink.logged
                if known is None:
                    known = {sink.metric_key(k): step for k, step in self.recorded.items()}
                self.logged[sink.name] = dict(known)
        while True:
            kind, *args = self.jobs.get()
            if kind == "metrics":
                for sink in list(self.sinks):
                    self._send(sink, *args)
            elif kind == "checkpoint":
                step, folder = args
                for sink in [s for s in self.sinks if s.checkpoints]:
                    self._call(sink, f"checkpoint {step}", sink.log_checkpoint, step, folder)
                shutil.rmtree(folder, ignore_errors=True)
                with self.lock:
                    self.staged -= 1
            else:  # finish: the last job
                for sink in list(self.sinks):
                    self._call(sink, "finish", sink.finish, *args)
                return

    def _send(self, sink: Sink, step: int, metrics: dict[str, float]) -> None:
        """The metrics at `step` that `sink` does not have yet."""
        logged = self.logged[sink.name]
        fresh = {k: v for k, v in metrics.items() if step > logged.get(sink.metric_key(k), -1)}
        if fresh:
            self._call(sink, f"metrics of step {step}", sink.log_metrics, step, fresh)
            logged.update({sink.metric_key(k): step for k in fresh})

    def _call(self, sink: Sink, during: str, method, *args) -> Any:
        """`method` of `sink`; on any failure, the sink is dropped with a warning event."""
        try:
            return method(*args) or {}
        except Exception as exc:
            self.sinks.remove(sink)
            error = f"{type(exc).__name__}: {exc}"
            log.warning("run %s: tracker %s failed (%s)", self.run.run_id, sink.name, error)
            self._event(
                EventType.TRACKING_FAILED,
                f"tracking with {sink.name} failed ({during}) and stopped for this attempt; "
                f"the run goes on: {error}",
                EventLevel.WARNING,
                {"tracker": sink.name, "during": during, "error": error[:1000]},
            )
            if during != "finish":
                try:  # let it close what it opened
                    sink.finish(None)
                except Exception:
                    log.debug("tracker %s did not close", sink.name, exc_info=True)
            return None

    def _event(self, type_, message, level=EventLevel.INFO, data=None) -> None:
        try:
            self.recorder.event(type_, message, level, data)
        except Exception:  # the database is the run's to worry about
            log.warning("run %s: could not record %s", self.run.run_id, type_, exc_info=True)


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def start_tracking(settings: Settings, recorder, spec: RunSpec) -> Tracking | None:
    """The attempt's tracking session for the trackers the run's spec names (None: none),
    started; the lead process's only."""
    sinks = sinks_of(settings, spec)
    if not sinks:
        return None
    try:
        stored, recorded = recorder.tracking_state()
    except Exception as exc:  # the database's trouble is the run's to meet, not tracking's
        log.warning("run %s: no tracking (%s)", recorder.run_id, exc, exc_info=True)
        return None
    run = RunInfo(
        run_id=recorder.run_id,
        name=stored.get("name") or recorder.run_id,
        spec=stored,
        folder=settings.runs_dir / recorder.run_id,
        resumed=bool(recorded),
    )
    tracking = Tracking(recorder, sinks, run, recorded)
    tracking.thread.start()
    return tracking
