"""The worker's Celery app: the contract's (service/contract/tasks.py), with this package's tasks.
Built from settings on demand (never at import), one per process."""

from celery import Celery

from service.config import Settings
from service.contract.tasks import celery_app


def create_celery_app(settings: Settings) -> Celery:
    return celery_app(settings, include=("workers.tasks",))
