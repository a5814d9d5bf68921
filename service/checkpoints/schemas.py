from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict


class CheckpointRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: Literal["checkpoint"] = "checkpoint"
    run_id: str
    step: int
    path: str
    bytes: int
    kind: Literal["full", "lora_adapter"]
    created_at: datetime


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CheckpointRead]
