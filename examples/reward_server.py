"""A reference reward model for gvpo-service webhooks: copy it and put your scoring in `score`.

It checks every request's GVPO-Signature with the run's webhook secret (from the create-run
response), then answers in the mode your run spec uses:

- sync:  200 {"rewards": [{"sample_id", "reward"}, ...]}
- async: 202 at once, then a signed POST of {"request_id", "rewards"} to the request's
         callback_url (needs a gvpo-service version with async callbacks).

Run it:  REWARD_WEBHOOK_SECRET=whsec_... uvicorn examples.reward_server:app --port 9000
and submit a run with  reward: {type: webhook, url: http://127.0.0.1:9000/score, mode: sync}
(a loopback URL needs GVPO_WEBHOOK_ALLOW_PRIVATE=true on the service).
"""

import json
import os

import httpx
from fastapi import BackgroundTasks, FastAPI, Request
from fastapi.responses import JSONResponse

from gvpo_client.signing import HEADER, SignatureError, sign, verify

SECRET = os.environ.get("REWARD_WEBHOOK_SECRET", "")
MODE = os.environ.get("REWARD_MODE", "sync")

app = FastAPI(title="reference reward model")


def score(prompt: str, completion: str, answer: str | None) -> float:
    """Your reward model. This one gives 1.0 for an exact answer, else 0.0."""
    return float(answer is not None and completion.strip() == answer.strip())


def rewards_for(payload: dict) -> list[dict]:
    return [
        {
            "sample_id": item["sample_id"],
            "reward": score(item["prompt"], item["completion"], item.get("answer")),
        }
        for item in payload["items"]
    ]


def post_callback(payload: dict) -> None:
    body = json.dumps({"request_id": payload["request_id"], "rewards": rewards_for(payload)})
    httpx.post(
        payload["callback_url"],
        content=body,
        timeout=30,
        headers={"Content-Type": "application/json", HEADER: sign(SECRET, body.encode())},
    )


@app.post("/score")
async def score_request(request: Request, background: BackgroundTasks) -> JSONResponse:
    body = await request.body()
    try:
        verify(SECRET, request.headers.get(HEADER), body)  # also rejects stale timestamps
    except SignatureError as exc:
        return JSONResponse({"error": str(exc)}, status_code=401)
    payload = json.loads(body)
    if MODE == "async":
        background.add_task(post_callback, payload)
        return JSONResponse({"accepted": payload["request_id"]}, status_code=202)
    return JSONResponse({"rewards": rewards_for(payload)})
