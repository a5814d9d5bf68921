from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request, Response

from gvpo_client.signing import HEADER
from service.contract.limits import MAX_CREDENTIAL
from service.contract.webhooks import RewardCallback
from service.deps import PathId, ProjectDep, SessionDep, SettingsDep, answer_in_session
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


async def _raw_body(request: Request, settings: SettingsDep) -> bytes:
    """The exact bytes sent (the signature covers them), refused past max_callback_bytes
    before more than that is read."""
    limit = settings.max_callback_bytes
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


@router.post("/{run_id}/rewards", response_model=CallbackAccepted, openapi_extra=CALLBACK_BODY)
async def reward_callback(
    run_id: PathId,
    raw: Annotated[bytes, Depends(_raw_body)],
    settings: SettingsDep,
    signature: Annotated[str | None, Header(alias=HEADER, max_length=MAX_CREDENTIAL)] = None,
) -> Response:
    """Async reward callback from a reward model, signed with the run's webhook secret
    (no API key): {"request_id": "rq_…", "rewards": [{"sample_id": "smp_…", "reward": 0.5}]}.

    The database work runs in the threadpool, in one trip (answer_in_session): it must never
    block the event loop, or a callback waiting on a lock would stop another request's commit
    from running."""
    return await answer_in_session(
        settings,
        lambda session: CallbackAccepted(
            **service.accept_callback(session, settings, run_id, raw, signature)
        ),
    )


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
