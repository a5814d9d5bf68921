from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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
    # What OpenAI's file object also has, for its SDK (client.files.create): a file here is
    # checked line by line before it is recorded, so it is always processed, and never expires.
    status: Literal["processed"] = Field(
        "processed", description="always processed: an upload is checked before it is recorded"
    )
    status_details: None = None
    expires_at: None = Field(None, description="files do not expire")


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileRead]
    has_more: Literal[False] = Field(False, description="the list is every file: one page")
