from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class SubmitRewardsRequest(_message.Message):
    __slots__ = ("run_id", "body")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    body: bytes
    def __init__(self, run_id: _Optional[str] = ..., body: _Optional[bytes] = ...) -> None: ...

class SubmitRewardsResponse(_message.Message):
    __slots__ = ("request_id", "accepted", "complete")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    accepted: int
    complete: bool
    def __init__(self, request_id: _Optional[str] = ..., accepted: _Optional[int] = ..., complete: _Optional[bool] = ...) -> None: ...
