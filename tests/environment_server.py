"""A real environment over loopback HTTP for the tests (DESIGN.md §v2.1's environment.step):
checks signatures as the reward server does, answers each episode, and can be told to fail or
to break the protocol. Runs uvicorn in a thread of the test process (services.ThreadServer)."""

import json
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from gvpo_client.signing import REQUEST_ID_HEADER

from reward_server import unsigned
from services import ThreadServer


def result(item: dict, turn: int) -> dict:
    """The environment's answer to one episode: a tool result after the first turn, then done
    with a reward that depends on the conversation."""
    if turn == 1:
        message = {"role": "tool", "content": "42", "tool_call_id": "call_0"}
        return {"episode_id": item["episode_id"], "messages": [message], "done": False}
    reward = len(item["messages"]) / 10
    return {"episode_id": item["episode_id"], "messages": [], "done": True, "reward": reward}


@dataclass
class EnvBehaviour:
    secret: str = ""
    fail_first: int = 0  # answer 503 to the first N signed requests
    fail_after: int | None = None  # answer 503 to every signed request after the first N
    retry_after: str | None = "0"
    # "reward_not_done" | "missing" | "unknown" | "repeated" | "not_json" | "bad_role" |
    # "oversized"
    lie: str | None = None
    calls: int = 0  # signed requests
    payloads: list[dict] = field(default_factory=list)  # each answered request's body
    request_ids: list[str] = field(default_factory=list)  # and its GVPO-Request-Id


def _lie(lie: str | None, out: list[dict]) -> None:
    if lie == "reward_not_done":
        out[-1] = {**out[-1], "done": False, "reward": 1.0}
    elif lie == "missing":
        out.pop()
    elif lie == "unknown":
        out[0] = {**out[0], "episode_id": "ep_not_mine"}
    elif lie == "repeated":
        out[-1] = {**out[0]}
    elif lie == "bad_role":
        out[0] = {**out[0], "messages": [{"role": "assistant", "content": "I decide"}]}


def make_app(b: EnvBehaviour) -> FastAPI:
    app = FastAPI()

    @app.post("/step")
    async def step(request: Request) -> Response:
        body = await request.body()
        if refusal := unsigned(b.secret, request, body):
            return refusal
        b.calls += 1
        if b.calls <= b.fail_first or (b.fail_after is not None and b.calls > b.fail_after):
            headers = {"Retry-After": b.retry_after} if b.retry_after else {}
            return JSONResponse({"error": "overloaded"}, status_code=503, headers=headers)
        payload = json.loads(body)
        b.payloads.append(payload)
        b.request_ids.append(request.headers.get(REQUEST_ID_HEADER))
        if b.lie == "not_json":
            return Response("<html>502 from a proxy</html>", media_type="text/html")
        out = [result(item, payload["turn"]) for item in payload["items"]]
        _lie(b.lie, out)
        answer = {"results": out}
        if b.lie == "oversized":
            answer["padding"] = "x" * 100_000
        return JSONResponse(answer)

    return app


class EnvironmentServer(ThreadServer):
    def __init__(self, behaviour: EnvBehaviour) -> None:
        super().__init__(make_app(behaviour))
        self.behaviour = behaviour

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/step"
