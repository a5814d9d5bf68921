"""OpenAI-compatible inference (DESIGN.md §v2.2): GET /v1/models, POST /v1/chat/completions
and POST /v1/completions, with the project's API key, so the official SDK works with only its
base_url and api_key changed.

The API authenticates, resolves `model` for the project (service/serving/models.py; a key and a
checkpoint seen in the last seconds are not looked up again: lookups.py), routes to
an inference worker holding it (routing.py) and relays the request to vLLM's own OpenAI server
there, as it came, and vLLM's answer back as it comes: its fields, its errors (OpenAI's shape,
with their 4xx statuses), its server-sent events. Only a request with metadata.gvpo_episode is
read on the way (recording.py), to record the exact ids and give each choice its completion id.
Each answer's `usage` is counted for the project (metering.py): a streamed request is asked for
its usage chunk, which a client that did not ask for it does not get.
"""

import functools
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from service.deps import PathId, ProjectDep, RecentProjectDep, SessionDep, SettingsDep
from service.errors import BadRequest, ServiceUnavailable
from service.models import Project
from service.serving.lookups import Lookups
from service.serving.metering import Meter
from service.serving.models import OWNER, ServedModel, listed, resolve
from service.serving.recording import Recorder, episode_of
from service.serving.routing import Router

router = APIRouter(prefix="/v1", tags=["inference"])

SSE = "text/event-stream"
JSON_BODY = {"Content-Type": "application/json"}


def _model_object(model: ServedModel) -> dict[str, Any]:
    return {
        "id": model.name,
        "object": "model",
        "created": int(model.created.timestamp()),
        "owned_by": OWNER,
        "run_id": model.run_id,
        "step": model.version,
    }


@router.get("/models")
def list_models(session: SessionDep, project: ProjectDep) -> dict[str, Any]:
    """The project's models: runs that publish their weights, and checkpoints."""
    return {"object": "list", "data": [_model_object(m) for m in listed(session, project)]}


@router.get("/models/{model}")
def get_model(
    model: PathId, session: SessionDep, project: ProjectDep, settings: SettingsDep
) -> dict[str, Any]:
    return _model_object(resolve(session, settings, project, model))


@router.post("/chat/completions")
async def chat_completions(
    request: Request, project: RecentProjectDep, settings: SettingsDep
) -> Response:
    """vLLM's chat completions for the project's model (OpenAI's request and answer)."""
    return await _relay(request, "/v1/chat/completions", project, settings)


@router.post("/completions")
async def completions(
    request: Request, project: RecentProjectDep, settings: SettingsDep
) -> Response:
    """vLLM's text completions for the project's model (OpenAI's request and answer)."""
    return await _relay(request, "/v1/completions", project, settings)


def _body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise BadRequest(f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise BadRequest("'model' is required: a checkpoint id (ckpt_…) or a run id (run_…)")
    if not isinstance(body.get("stream", False), bool):
        raise BadRequest("'stream' must be true or false")
    return body


async def _relay(request: Request, path: str, project: Project, settings) -> Response:
    raw = await request.body()  # passed on as it came, unless recorded
    body = _body(raw)
    episode = episode_of(body)
    lookups: Lookups = request.app.state.lookups
    model = await lookups.model(project, body["model"])
    router_: Router = request.app.state.serving
    recorder = None
    keep = _ask_usage(body)
    if not keep:
        raw = json.dumps(body).encode()
    if episode is not None:
        recorder = Recorder(
            settings.resolved_database_url,
            project.id,
            model,
            episode,
            show_ids=bool(body.get("return_token_ids")),
        )
        body["return_token_ids"] = True
        raw = json.dumps(body).encode()
    for attempt in range(2):  # a server unloaded or restarted since the route was cached
        route = await router_.route(model)
        try:
            upstream = await router_.relay().post(route.url + path, data=raw, headers=JSON_BODY)
        except aiohttp.ClientError:
            router_.forget(model.name)
            if attempt:
                raise ServiceUnavailable(
                    f"the inference worker serving {model.name} stopped answering; try again"
                ) from None
            continue
        break
    if recorder is not None:
        recorder.version = route.version  # the weights that serve it
    meter: Meter = request.app.state.meter
    usage = _Usage(functools.partial(meter.add, project.id, model.run_id), keep)
    return await _answer(upstream, recorder, usage)


def _ask_usage(body: dict[str, Any]) -> bool:
    """Ask a streamed request's usage chunk of vLLM; whether the client asked for it itself
    (a `stream_options` that is not an object is left for vLLM to refuse)."""
    options = body.get("stream_options")
    if not body.get("stream") or options is not None and not isinstance(options, dict):
        return True
    if (options or {}).get("include_usage") is True:
        return True
    body["stream_options"] = {**(options or {}), "include_usage": True}
    return False


@dataclass
class _Usage:
    """An answer's usage, counted once its end is known (`count`); `keep`: whether the client
    gets a streamed usage chunk."""

    count: Callable[[object], None]
    keep: bool
    seen: object = None

    def of_event(self, event: object) -> bool:
        """Note a streamed event's usage; False for an event the client did not ask for (the
        usage chunk with no choices)."""
        if isinstance(event, dict) and isinstance(event.get("usage"), dict):
            self.seen = event["usage"]
            if not self.keep:
                if not event.get("choices"):
                    return False
                event["usage"] = None
        return True


async def _answer(
    upstream: aiohttp.ClientResponse, recorder: Recorder | None, usage: _Usage
) -> Response:
    content_type = upstream.headers.get("Content-Type")
    if not (content_type or "").startswith(SSE) or upstream.status >= 400:
        try:
            content = await upstream.read()
        finally:
            upstream.release()
        if upstream.status >= 400:
            return Response(content, status_code=upstream.status, media_type=content_type)
        try:
            answer = json.loads(content)
        except ValueError:
            answer = None
        usage.count(answer.get("usage") if isinstance(answer, dict) else None)
        if recorder is None:
            return Response(content, status_code=upstream.status, media_type=content_type)
        answer = recorder.whole(answer)
        await run_in_threadpool(recorder.store)
        return JSONResponse(answer)
    return StreamingResponse(_events(upstream, recorder, usage), media_type=SSE)


async def _lines(upstream: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The answer's lines without their ends, however long (aiohttp's own readline has a
    limit that an event with a long prompt's token ids could pass)."""
    rest = b""
    async for chunk in upstream.content.iter_any():
        *lines, rest = (rest + chunk).split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode()
    if rest:
        yield rest.rstrip(b"\r").decode()


async def _events(
    upstream: aiohttp.ClientResponse, recorder: Recorder | None, usage: _Usage
) -> AsyncIterator[bytes]:
    """vLLM's events, line by line as they come, their usage counted. Recorded: each chunk's
    choices given their completion ids, and the completions stored when the stream has ended,
    before its closing [DONE]. Else each line as vLLM sent it, but for the usage chunk a client
    did not ask for."""
    skipped = False
    try:
        async for line in _lines(upstream):
            if skipped and not line:  # the blank line that ended a dropped event
                skipped = False
                continue
            data = line[len("data: ") :] if line.startswith("data: ") else None
            if recorder is not None and data is not None and data.strip() == "[DONE]":
                await run_in_threadpool(recorder.store)
            if data is None or not data.startswith("{"):
                yield f"{line}\n".encode()
                continue
            if recorder is None and '"usage"' not in data:
                yield f"{line}\n".encode()  # most chunks: passed on unread
                continue
            try:
                event = json.loads(data)
            except ValueError:
                yield f"{line}\n".encode()
                continue
            if not usage.of_event(event):
                skipped = True
                continue
            if recorder is not None:
                event = recorder.chunk(event)
            elif usage.keep:
                yield f"{line}\n".encode()
                continue
            yield f"data: {json.dumps(event)}\n".encode()
    finally:
        upstream.release()  # closes the connection unless the answer was read to its end
        usage.count(usage.seen)
