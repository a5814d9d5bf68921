"""A real reward model over loopback HTTP for the tests: checks signatures (`unsigned`, which
the environment server shares), scores, and can be told to fail, stall or lie. Runs uvicorn in a
thread of the test process (services.ThreadServer)."""

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from fastapi import BackgroundTasks, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from gvpo_client.signing import HEADER, REQUEST_ID_HEADER, SignatureError, sign, verify

from services import ThreadServer


def score(completion: str) -> float:
    """The reward model's verdict: deterministic, with spread inside every group."""
    return round((len(completion) * 7 + sum(map(ord, completion))) % 11 / 10, 3)


@dataclass
class Behaviour:
    secret: str = ""
    fail_first: int = 0  # answer 503 to the first N requests
    fail_after: int | None = None  # answer 503 to every request after the first N
    retry_after: str | None = "0"
    lie: str | None = None  # "nan" | "unknown_id" | "missing" | "status_404"
    mode: str = "sync"  # "async": answer 202, then POST the rewards to the callback_url
    call_back: bool = True  # async: False never calls back
    # async: how a callback is sent, (callback URL, body, signature) -> status; default HTTP POST
    send_callback: Callable[[str, bytes, str], int] | None = None
    calls: int = 0
    rewards: dict[str, float] = field(default_factory=dict)
    request_ids: list[str] = field(default_factory=list)
    purposes: list[str] = field(default_factory=list)  # each request's "purpose"
    items: list[dict] = field(default_factory=list)  # every item scored, as sent
    callback_statuses: list[int] = field(default_factory=list)


def post_callback(url: str, body: bytes, signature: str) -> int:
    resp = httpx.post(
        url,
        content=body,
        timeout=30,
        headers={"Content-Type": "application/json", HEADER: signature},
    )
    return resp.status_code


def unsigned(secret: str, request: Request, body: bytes) -> Response | None:
    """The 401 for a request whose GVPO-Signature does not verify with `secret`, else None."""
    try:
        verify(secret, request.headers.get(HEADER), body)
    except SignatureError as exc:
        return JSONResponse({"error": str(exc)}, status_code=401)
    return None


def make_app(b: Behaviour) -> FastAPI:
    app = FastAPI()

    def call_back(payload: dict) -> None:
        out = [
            {"sample_id": i["sample_id"], "reward": b.rewards[i["sample_id"]]}
            for i in payload["items"]
        ]
        body = json.dumps({"request_id": payload["request_id"], "rewards": out}).encode()
        send = b.send_callback or post_callback
        b.callback_statuses.append(send(payload["callback_url"], body, sign(b.secret, body)))

    @app.post("/score")
    async def score_items(request: Request, background: BackgroundTasks) -> Response:
        body = await request.body()
        if refusal := unsigned(b.secret, request, body):
            return refusal
        b.calls += 1
        failing = b.calls <= b.fail_first or (b.fail_after is not None and b.calls > b.fail_after)
        if failing:
            headers = {"Retry-After": b.retry_after} if b.retry_after else {}
            return JSONResponse({"error": "overloaded"}, status_code=503, headers=headers)
        if b.lie == "status_404":
            return JSONResponse({"error": "no such model"}, status_code=404)
        payload = json.loads(body)
        b.request_ids.append(request.headers.get(REQUEST_ID_HEADER))
        b.purposes.append(payload.get("purpose"))
        out = []
        for item in payload["items"]:
            b.items.append(item)
            b.rewards[item["sample_id"]] = score(item["completion"])
            out.append({"sample_id": item["sample_id"], "reward": b.rewards[item["sample_id"]]})
        if b.mode == "async":
            if b.call_back:
                background.add_task(call_back, payload)
            return JSONResponse({"accepted": payload["request_id"]}, status_code=202)
        if b.lie == "nan":
            out[0]["reward"] = math.nan
        elif b.lie == "unknown_id":
            out[0]["sample_id"] = "smp_not_mine"
        elif b.lie == "missing":
            out.pop()
        # json.dumps writes NaN as a bare NaN token, as a careless reward model would
        return Response(json.dumps({"rewards": out}), media_type="application/json")

    return app


class RewardServer(ThreadServer):
    def __init__(self, behaviour: Behaviour) -> None:
        super().__init__(make_app(behaviour))
        self.behaviour = behaviour

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/score"
