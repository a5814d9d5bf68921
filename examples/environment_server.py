"""A reference environment for gvpo-service episodes: copy it and put your task in `answer`.

gvpo-service POSTs one signed `environment.step` per turn of a step, carrying every episode
still going (DESIGN.md §v2.1); this server checks the GVPO-Signature with the run's webhook
secret, then answers each episode with the messages the policy sees next, whether it is done,
and (when done) its reward.

The task here is secret_code, the built-in toy environment's, over HTTP: after the policy's
first turn the environment tells it the row's `answer` (a code its prompt never shows); after
the second turn the episode ends, rewarded with the share of the code's characters the policy
repeated in place.

Run it:  ENVIRONMENT_WEBHOOK_SECRET=whsec_... uvicorn examples.environment_server:app --port 9100
and submit a run with  environment: {type: webhook, url: http://127.0.0.1:9100/step}
(a loopback URL needs GVPO_WEBHOOK_ALLOW_PRIVATE=true on the service).
"""

import json
import os

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from gvpo_client.signing import HEADER, SignatureError, verify

SECRET = os.environ.get("ENVIRONMENT_WEBHOOK_SECRET", "")
REVEAL = os.environ.get("ENVIRONMENT_REVEAL", "{answer}")

app = FastAPI(title="reference environment")


def answer(turn: int, item: dict, messages: list[dict]) -> dict:
    """Your environment: what one episode gets after the policy's turn number `turn`."""
    code = str(item.get("answer", ""))
    if turn == 1:
        return {"messages": [{"role": "user", "content": REVEAL.format(answer=code)}]}
    said = messages[-1].get("content") or ""
    matched = sum(a == b for a, b in zip(code, said, strict=False))
    return {"messages": [], "done": True, "reward": matched / len(code) if code else 0.0}


@app.post("/step")
async def step(request: Request) -> JSONResponse:
    body = await request.body()
    try:
        verify(SECRET, request.headers.get(HEADER), body)  # also rejects stale timestamps
    except SignatureError as exc:
        return JSONResponse({"error": str(exc)}, status_code=401)
    payload = json.loads(body)
    results = [
        {
            "episode_id": item["episode_id"],
            **answer(payload["turn"], item["item"], item["messages"]),
        }
        for item in payload["items"]
    ]
    return JSONResponse({"results": results})
