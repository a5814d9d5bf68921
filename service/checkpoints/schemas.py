from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.contract.storage import CheckpointKind


class CheckpointRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: Literal["checkpoint"] = "checkpoint"
    run_id: str
    step: int
    bytes: int
    kind: CheckpointKind
    created_at: datetime


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CheckpointRead]


class DownloadLink(BaseModel):
    url: str = Field(description="path and query on the API's origin; GET it without an API key")
    expires_at: datetime
