from typing import Any

from fastapi import APIRouter, Request, Response

from gvpo_client.signing import HEADER
from service.config import Settings
from service.contract.limits import MAX_CREDENTIAL, MAX_ID
from service.contract.webhooks import RewardCallback
from service.db import Steps
from service.deps import PathId, ProjectDep, SessionDep, SettingsDep, answer_steps, too_long
from service.errors import PayloadTooLarge
from service.rewards import service
from service.rewards.schemas import CallbackAccepted, SecretRotated

router = APIRouter(prefix="/v1/runs", tags=["rewards"])


def _inlined(schema: Any, defs: dict[str, Any]) -> Any:
    if isinstance(schema, dict):
        if "$ref" in schema:
            return _inlined(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
        return {k: _inlined(v, defs) for k, v in schema.items() if k != "$defs"}
    return [_inlined(v, defs) for v in schema] if isinstance(schema, list) else schema


# The callback's body, for the OpenAPI document: the route reads the raw bytes (the signature
# covers them exactly), so FastAPI cannot describe it from a parameter.
_CALLBACK_SCHEMA = RewardCallback.model_json_schema()
CALLBACK_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": _inlined(_CALLBACK_SCHEMA, _CALLBACK_SCHEMA.get("$defs", {}))
            }
        },
    }
}


# What FastAPI would read from the route's parameters, read by the route itself (a callback is
# the API's busiest request, and FastAPI's parameter handling cost it a fifth of its CPU), and
# documented here for the OpenAPI document.
CALLBACK_PARAMETERS = [
    {
        "name": "run_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "maxLength": MAX_ID, "title": "Run Id"},
    },
    {
        "name": HEADER,
        "in": "header",
        "required": False,
        "schema": {
            "anyOf": [{"type": "string", "maxLength": MAX_CREDENTIAL}, {"type": "null"}],
            "title": HEADER.title(),
        },
    },
]


async def _raw_body(request: Request, limit: int) -> bytes:
    """The exact bytes sent (the signature covers them), refused past max_callback_bytes
    before more than that is read."""
    too_large = PayloadTooLarge(f"callback body is larger than the {limit}-byte limit")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


@router.post(
    "/{run_id}/rewards",
    response_model=CallbackAccepted,
    openapi_extra={**CALLBACK_BODY, "parameters": CALLBACK_PARAMETERS},
)
async def reward_callback(request: Request) -> Response:
    """Async reward callback from a reward model, signed with the run's webhook secret
    (no API key): {"request_id": "rq_…", "rewards": [{"sample_id": "smp_…", "reward": 0.5}]}."""
    settings: Settings = request.app.state.settings
    run_id = request.path_params["run_id"]
    if len(run_id) > MAX_ID:
        raise too_long("path", "run_id", run_id, MAX_ID)
    signature = request.headers.get(HEADER)
    if signature is not None and len(signature) > MAX_CREDENTIAL:
        raise too_long("header", HEADER, signature, MAX_CREDENTIAL)
    raw = await _raw_body(request, settings.max_callback_bytes)

    def steps() -> Steps[CallbackAccepted]:
        answer = yield from service.callback_steps(settings, run_id, raw, signature)
        return CallbackAccepted(**answer)

    return await answer_steps(request, steps)


@router.post("/{run_id}/webhook-secret/rotate", response_model=SecretRotated)
def rotate_webhook_secret(
    run_id: PathId,
    session: SessionDep,
    project: ProjectDep,
    settings: SettingsDep,
) -> SecretRotated:
    """A new webhook secret, shown once; the previous one keeps verifying callbacks for
    GVPO_WEBHOOK_SECRET_GRACE_S seconds."""
    return SecretRotated(**service.rotate_secret(session, settings, project, run_id))
