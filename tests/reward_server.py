"""A real reward model over loopback HTTP for the tests: checks signatures, scores, and can be
told to fail, stall or lie. Runs uvicorn in a thread of the test process."""

import json
import math
import threading
import time
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from service.rewards.signing import HEADER, REQUEST_ID_HEADER, SignatureError, verify
from service.stack import free_port


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
    calls: int = 0
    rewards: dict[str, float] = field(default_factory=dict)
    request_ids: list[str] = field(default_factory=list)


def make_app(b: Behaviour) -> FastAPI:
    app = FastAPI()

    @app.post("/score")
    async def score_items(request: Request) -> Response:
        body = await request.body()
        try:
            verify(b.secret, request.headers.get(HEADER), body)
        except SignatureError as exc:
            return JSONResponse({"error": str(exc)}, status_code=401)
        b.calls += 1
        failing = b.calls <= b.fail_first or (b.fail_after is not None and b.calls > b.fail_after)
        if failing:
            headers = {"Retry-After": b.retry_after} if b.retry_after else {}
            return JSONResponse({"error": "overloaded"}, status_code=503, headers=headers)
        if b.lie == "status_404":
            return JSONResponse({"error": "no such model"}, status_code=404)
        payload = json.loads(body)
        b.request_ids.append(request.headers.get(REQUEST_ID_HEADER))
        out = []
        for item in payload["items"]:
            b.rewards[item["sample_id"]] = score(item["completion"])
            out.append({"sample_id": item["sample_id"], "reward": b.rewards[item["sample_id"]]})
        if b.lie == "nan":
            out[0]["reward"] = math.nan
        elif b.lie == "unknown_id":
            out[0]["sample_id"] = "smp_not_mine"
        elif b.lie == "missing":
            out.pop()
        # json.dumps writes NaN as a bare NaN token, as a careless reward model would
        return Response(json.dumps({"rewards": out}), media_type="application/json")

    return app


class RewardServer:
    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour, self.port = behaviour, free_port()
        config = uvicorn.Config(make_app(behaviour), host="127.0.0.1", port=self.port,
                                log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/score"

    def __enter__(self) -> "RewardServer":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "reward server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
