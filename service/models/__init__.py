"""ORM classes only; importing this package registers every table on Base.metadata."""

from service.models.base import Base
from service.models.checkpoint import Checkpoint
from service.models.completion import Completion
from service.models.file import File
from service.models.fine_tuning_job import FineTuningJob
from service.models.inference_worker import InferenceWorker
from service.models.metric import Metric, MetricPage, MetricRollup
from service.models.project import ApiKey, Project
from service.models.registered_model import RegisteredModel
from service.models.rescore import Rescore, RewardHistory
from service.models.reward_request import RewardRequest
from service.models.run import Run
from service.models.run_event import RunEvent
from service.models.run_group import RunGroup
from service.models.sample import Sample
from service.models.usage import InferenceUsage, Usage

__all__ = [
    "ApiKey",
    "Base",
    "Checkpoint",
    "Completion",
    "File",
    "FineTuningJob",
    "InferenceUsage",
    "InferenceWorker",
    "Metric",
    "MetricPage",
    "MetricRollup",
    "Project",
    "RegisteredModel",
    "Rescore",
    "RewardHistory",
    "RewardRequest",
    "Run",
    "RunEvent",
    "RunGroup",
    "Sample",
    "Usage",
]
