"""The Celery app: built from settings on demand (never at import), one per process and broker.

acks_late + prefetch 1: a run's message is acknowledged only when the task returns, and a worker
never reserves a second run while one is training.
"""

from functools import lru_cache

from celery import Celery

from service.config import Settings

RUN_TASK = "gvpo.run"
RESCORE_TASK = "gvpo.rescore"


def _filesystem_options(settings: Settings) -> dict:
    # kombu's filesystem transport needs its folders made first, and in == out for one machine.
    queue_dir = settings.broker_dir / "queue"
    processed = settings.broker_dir / "processed"
    for folder in (queue_dir, processed):
        folder.mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(queue_dir),
        "data_folder_out": str(queue_dir),
        "processed_folder": str(processed),
        "store_processed": False,
        "control_folder": str(settings.broker_dir / "control"),
    }


def create_celery_app(settings: Settings) -> Celery:
    app = Celery("gvpo", broker=settings.broker_url, include=["workers.tasks"])
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue="default",
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    if settings.broker_url.startswith("filesystem"):
        (settings.broker_dir / "control").mkdir(parents=True, exist_ok=True)
        app.conf.broker_transport_options = _filesystem_options(settings)
    return app


@lru_cache(maxsize=4)
def _cached_app(settings_json: str) -> Celery:
    return create_celery_app(Settings.model_validate_json(settings_json))


def get_celery_app(settings: Settings) -> Celery:
    return _cached_app(settings.model_dump_json())
