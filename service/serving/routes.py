"""OpenAI-compatible inference (DESIGN.md §v2.2): GET /v1/models, POST /v1/chat/completions
and POST /v1/completions, with the project's API key, so the official SDK works with only its
base_url and api_key changed.

The API authenticates, resolves `model` for the project (service/serving/models.py), routes to
an inference worker holding it (routing.py) and relays the request to vLLM's own OpenAI server
there, as it came, and vLLM's answer back as it comes: its fields, its errors (OpenAI's shape,
with their 4xx statuses), its server-sent events. Only a request with metadata.gvpo_episode is
read on the way (recording.py), to record the exact ids and give each choice its completion id.
"""

import json
from typing import Any

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from service.deps import PathId, ProjectDep, SessionDep, SettingsDep
from service.errors import BadRequest, ServiceUnavailable
from service.serving.models import OWNER, ServedModel, listed, resolve
from service.serving.recording import Recorder, episode_of
from service.serving.routing import Router

router = APIRouter(prefix="/v1", tags=["inference"])

SSE = "text/event-stream"


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
    request: Request, session: SessionDep, project: ProjectDep, settings: SettingsDep
) -> Response:
    """vLLM's chat completions for the project's model (OpenAI's request and answer)."""
    return await _relay(request, "/v1/chat/completions", session, project, settings)


@router.post("/completions")
async def completions(
    request: Request, session: SessionDep, project: ProjectDep, settings: SettingsDep
) -> Response:
    """vLLM's text completions for the project's model (OpenAI's request and answer)."""
    return await _relay(request, "/v1/completions", session, project, settings)


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except ValueError as exc:
        raise BadRequest(f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise BadRequest("'model' is required: a checkpoint id (ckpt_…) or a run id (run_…)")
    if not isinstance(body.get("stream", False), bool):
        raise BadRequest("'stream' must be true or false")
    return body


async def _relay(request: Request, path: str, session, project, settings) -> Response:
    body = await _body(request)
    episode = episode_of(body)
    model = await run_in_threadpool(resolve, session, settings, project, body["model"])
    session.close()  # no database connection held while the model generates
    router_: Router = request.app.state.serving
    recorder = None
    if episode is not None:
        recorder = Recorder(
            settings.resolved_database_url,
            project.id,
            model,
            episode,
            show_ids=bool(body.get("return_token_ids")),
        )
        body["return_token_ids"] = True
    for attempt in range(2):  # a server unloaded or restarted since the route was cached
        route = await router_.route(model)
        try:
            upstream = await router_.client.send(
                router_.client.build_request("POST", route.url + path, json=body),
                stream=True,
            )
        except httpx.TransportError:
            router_.forget(model.name)
            if attempt:
                raise ServiceUnavailable(
                    f"the inference worker serving {model.name} stopped answering; try again"
                ) from None
            continue
        break
    if recorder is not None:
        recorder.version = route.version  # the weights that serve it
    return await _answer(upstream, recorder)


async def _answer(upstream: httpx.Response, recorder: Recorder | None) -> Response:
    streamed = upstream.headers.get("content-type", "").startswith(SSE)
    if not streamed or upstream.status_code >= 400:
        content = await upstream.aread()
        await upstream.aclose()
        if recorder is None or upstream.status_code >= 400:
            return Response(
                content,
                status_code=upstream.status_code,
                media_type=upstream.headers.get("content-type"),
            )
        answer = recorder.whole(json.loads(content))
        await run_in_threadpool(recorder.store)
        return JSONResponse(answer)
    if recorder is None:
        return StreamingResponse(
            upstream.aiter_raw(), media_type=SSE, background=BackgroundTask(upstream.aclose)
        )
    return StreamingResponse(
        _recorded_events(upstream, recorder),
        media_type=SSE,
        background=BackgroundTask(upstream.aclose),
    )


async def _recorded_events(upstream: httpx.Response, recorder: Recorder):
    """vLLM's events with each chunk's choices given their completion ids; the completions are
    stored when the stream has ended, before its closing [DONE]."""
    async for line in upstream.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        if data.strip() == "[DONE]":
            await run_in_threadpool(recorder.store)
            yield b"data: [DONE]\n\n"
            continue
        try:
            event = json.loads(data)
        except ValueError:
            yield f"{line}\n\n".encode()
            continue
        yield f"data: {json.dumps(recorder.chunk(event))}\n\n".encode()
