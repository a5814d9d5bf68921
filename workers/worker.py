"""Starts a Celery worker for runs: one run at a time, one child process per run."""

import socket

from service.config import Settings
from workers.celery_app import create_celery_app


def run_worker(settings: Settings, queues: str | None = None, loglevel: str = "INFO") -> None:
    # Fail here, not in a run's first reward request, when a cluster worker lacks the key that
    # opens the stored webhook secrets (GVPO_ENCRYPTION_KEY).
    settings.sealer  # noqa: B018
    app = create_celery_app(settings)
    app.worker_main(
        [
            "worker",
            f"--queues={queues or settings.worker_queues}",
            "--pool=prefork",
            "--concurrency=1",
            # A fresh child per run returns the model's memory to the system when the run ends.
            "--max-tasks-per-child=1",
            f"--hostname=gvpo@{socket.gethostname()}",
            f"--loglevel={loglevel}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )
