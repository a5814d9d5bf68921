"""A fake OpenAI-compatible judge over loopback HTTP for the tests: POST /v1/chat/completions
answers the scores it is told to, as a chat completion with usage, and can be told to fail
first, fail always, refuse or need a key. Runs uvicorn in a thread of the test process
(services.ThreadServer); every request it took is kept."""

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from services import ThreadServer

PROMPT_TOKENS, COMPLETION_TOKENS = 11, 3


@dataclass
class Judging:
    # the judge's answer text for a request's messages (default: the scores below in turn)
    answer: Callable[[list[dict]], str] | None = None
    scores: list[str] = field(default_factory=lambda: ['{"result": 1.0}'])
    fail_first: int = 0  # answer 500 to the first N requests
    fail_always: bool = False
    status: int | None = None  # answer this status (with an error body) to every request
    refusal: str | None = None
    key: str | None = None  # the bearer token it requires
    delay_s: float = 0.0  # before answering: lets concurrent requests overlap
    requests: list[dict] = field(default_factory=list)  # bodies, as sent
    calls: int = 0
    in_flight: int = 0
    most_in_flight: int = 0


def make_app(j: Judging) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        j.calls += 1
        if j.key is not None and request.headers.get("authorization") != f"Bearer {j.key}":
            return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
        if j.fail_always or j.calls <= j.fail_first:
            return JSONResponse({"error": {"message": "judge overloaded"}}, status_code=500)
        if j.status is not None:
            return JSONResponse({"error": {"message": "refused"}}, status_code=j.status)
        body = json.loads(await request.body())
        j.requests.append(body)
        j.in_flight += 1
        j.most_in_flight = max(j.most_in_flight, j.in_flight)
        try:
            await asyncio.sleep(j.delay_s)
        finally:
            j.in_flight -= 1
        if j.answer is not None:
            text = j.answer(body["messages"])
        else:
            text = j.scores[(len(j.requests) - 1) % len(j.scores)]
        message = {"role": "assistant", "content": None if j.refusal else text}
        if j.refusal:
            message["refusal"] = j.refusal
        usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS}
        usage["total_tokens"] = PROMPT_TOKENS + COMPLETION_TOKENS
        return JSONResponse(
            {
                "id": f"chatcmpl-{j.calls}",
                "object": "chat.completion",
                "model": body["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": usage,
            }
        )

    return app


class JudgeServer(ThreadServer):
    def __init__(self, judging: Judging) -> None:
        super().__init__(make_app(judging))
        self.judging = judging

    @property
    def url(self) -> str:
        """Its base_url, as a score_model grader names it."""
        return f"http://127.0.0.1:{self.port}/v1"
