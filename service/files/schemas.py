from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict


class FileRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: Literal["file"] = "file"
    filename: str
    purpose: str
    bytes: int
    rows: int
    fields: list[str]
    created_at: datetime


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileRead]
