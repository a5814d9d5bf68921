"""Experiment trackers (the run spec's `tracking`: MLflow, W&B, TensorBoard): copies of a
run's metrics, spec and checkpoints, sent by the lead process on a thread of its own
(session.py), one sink per backend behind one interface (base.py). A tracker's failure is a
warning event, never the run's."""

from workers.tracking.session import Tracking, start_tracking

__all__ = ["Tracking", "start_tracking"]
