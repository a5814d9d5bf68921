from datetime import datetime
from typing import Literal

from pydantic import BaseModel


class CallbackAccepted(BaseModel):
    object: Literal["reward.callback"] = "reward.callback"
    request_id: str
    accepted: int  # rewards new in this callback (0 for an identical duplicate)
    complete: bool  # every sample of the request has its reward


class SecretRotated(BaseModel):
    run_id: str
    webhook_secret: str
    previous_secret_expires_at: datetime
