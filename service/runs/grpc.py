"""The gRPC Runs servicer: the REST routes' operations over the same service functions, and the
one place where runs, events and step metrics become proto messages."""

from collections.abc import AsyncIterator
from datetime import datetime

import grpc
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import Field, ValidationError
from sqlalchemy.orm import Session

from gvpo.v1 import runs_pb2 as pb
from gvpo.v1 import runs_pb2_grpc
from service import rpc
from service.config import Settings
from service.contract.limits import INT32_MAX, MAX_ID, MAX_IDEMPOTENCY_KEY, MAX_RUNS_PAGE, Strict
from service.contract.spec import RunSpec
from service.contract.states import STATES
from service.errors import InvalidSpec, invalid_spec
from service.metrics.schemas import StepMetrics
from service.models import Run
from service.runs import control, service, stream
from service.runs.schemas import EventRead, RunRead

DEFAULT_PAGE_SIZE = 20


# The scalar fields of the requests, with the limits that the REST routes' parameters have.
class WatchFields(rpc.RunRef):
    after_event_id: int = Field(ge=0, le=INT32_MAX)
    since_step: int = Field(ge=0, le=INT32_MAX)


class CreateFields(Strict):
    idempotency_key: str = Field(max_length=MAX_IDEMPOTENCY_KEY)


class ListFields(Strict):
    page_token: str = Field(max_length=MAX_ID)


def _timestamp(when: datetime | None) -> Timestamp | None:
    if when is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


def _struct(data: dict | None) -> Struct | None:
    if data is None:
        return None
    out = Struct()
    out.update(data)
    return out


def run_message(run: Run | RunRead) -> pb.Run:
    r = run if isinstance(run, RunRead) else RunRead.model_validate(run)
    return pb.Run(
        id=r.id,
        name=r.name or "",
        status=r.status,
        step=r.step,
        total_steps=r.total_steps,
        cancel_requested=r.cancel_requested,
        tokens_generated=r.tokens_generated,
        samples_generated=r.samples_generated,
        reward=r.reward,
        error=r.error or "",
        waiting_reason=r.waiting_reason or "",
        created_at=_timestamp(r.created_at),
        started_at=_timestamp(r.started_at),
        finished_at=_timestamp(r.finished_at),
        spec=_struct(r.spec),
    )


def update_message(item: RunRead | EventRead | StepMetrics) -> pb.RunUpdate:
    if isinstance(item, RunRead):
        return pb.RunUpdate(run=run_message(item))
    if isinstance(item, EventRead):
        return pb.RunUpdate(
            event=pb.RunEvent(
                id=item.id,
                created_at=_timestamp(item.created_at),
                type=item.type,
                level=item.level,
                message=item.message,
                data=_struct(item.data),
            )
        )
    return pb.RunUpdate(metrics=pb.StepMetrics(step=item.step, values=item.values))


def _spec(request: pb.CreateRunRequest) -> RunSpec:
    document = json_format.MessageToDict(request.spec)
    try:
        return RunSpec.model_validate(document)
    except ValidationError as exc:
        raise invalid_spec(exc.errors(), document, RunSpec) from None


def _list_args(request: pb.ListRunsRequest) -> int:
    """The page size, once page_size and the status filter are checked."""
    rpc.checked(ListFields, request)
    size = request.page_size or DEFAULT_PAGE_SIZE
    if not 1 <= size <= MAX_RUNS_PAGE:
        raise InvalidSpec(
            [
                {
                    "field": "page_size",
                    "message": f"must be between 1 and {MAX_RUNS_PAGE}, got {size}",
                }
            ]
        )
    if request.status and request.status not in STATES:
        raise InvalidSpec(
            [
                {
                    "field": "status",
                    "message": f"{request.status!r} is not a run "
                    f"state; use one of {', '.join(STATES)}",
                }
            ]
        )
    return size


class RunsServicer(runs_pb2_grpc.RunsServicer):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def CreateRun(self, request, context) -> pb.CreateRunResponse:
        project = rpc.authenticated(context, self.settings)

        def create(session: Session) -> pb.CreateRunResponse:
            owner = project(session)  # unauthenticated callers learn nothing about their spec
            key = rpc.checked(CreateFields, request).idempotency_key or None
            run, secret = service.create_run(session, self.settings, owner, _spec(request), key)
            return pb.CreateRunResponse(
                run=run_message(run), created=secret is not None, webhook_secret=secret or ""
            )

        return await rpc.call(context, self.settings, create)

    async def GetRun(self, request, context) -> pb.Run:
        return await self._one(context, request, service.get_run)

    async def ListRuns(self, request, context) -> pb.ListRunsResponse:
        project = rpc.authenticated(context, self.settings)

        def page(session: Session) -> pb.ListRunsResponse:
            owner, size = project(session), _list_args(request)
            rows, has_more = service.list_runs(
                session, owner, request.status or None, size, request.page_token or None
            )
            return pb.ListRunsResponse(
                runs=[run_message(r) for r in rows], next_page_token=rows[-1].id if has_more else ""
            )

        return await rpc.call(context, self.settings, page)

    async def CancelRun(self, request, context) -> pb.Run:
        return await self._one(context, request, control.cancel_run)

    async def PauseRun(self, request, context) -> pb.Run:
        return await self._one(context, request, control.pause_run)

    async def ResumeRun(self, request, context) -> pb.Run:
        return await self._one(
            context, request, lambda s, p, run_id: control.resume_run(s, self.settings, p, run_id)
        )

    async def _one(self, context, request, op) -> pb.Run:
        """op(session, project, run_id) on the request's run, as a Run message."""
        project = rpc.authenticated(context, self.settings)

        def one(session: Session) -> pb.Run:
            owner = project(session)
            return run_message(op(session, owner, rpc.checked(rpc.RunRef, request).run_id))

        return await rpc.call(context, self.settings, one)

    async def WatchRun(self, request, context) -> AsyncIterator[pb.RunUpdate]:
        project = rpc.authenticated(context, self.settings)

        # Only the ownership check here: the follower's first update is the run itself.
        def owned(session: Session) -> WatchFields:
            owner = project(session)
            fields = rpc.checked(WatchFields, request)
            service.get_run(session, owner, fields.run_id)
            return fields

        fields = await rpc.call(context, self.settings, owned)

        async def gone() -> bool:
            return context.cancelled()

        async for item in stream.follow(
            self.settings, fields.run_id, fields.after_event_id, fields.since_step, gone
        ):
            if item is not None:  # gRPC keeps idle streams open with its own pings
                yield update_message(item)


def add_to_server(server: grpc.aio.Server, settings: Settings) -> str:
    runs_pb2_grpc.add_RunsServicer_to_server(RunsServicer(settings), server)
    return pb.DESCRIPTOR.services_by_name["Runs"].full_name
