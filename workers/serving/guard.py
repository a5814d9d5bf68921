"""The ASGI middleware every vLLM server of an inference worker runs (`--middleware`): only
requests with the serve token pass, on every route but /health. vLLM's own `--api-key` guards
the OpenAI routes only, and leaves its weight and pause routes (/collective_rpc, /pause, ...)
open to anyone who can reach the port."""

import os
import secrets

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

TOKEN_VARIABLE = "GVPO_SERVE_TOKEN"
OPEN = ("/health",)  # the worker's own readiness check


class RequireServeToken:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.expected = f"Bearer {os.environ[TOKEN_VARIABLE]}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and scope["path"] not in OPEN:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                refusal = JSONResponse({"error": "an inference worker's model"}, status_code=401)
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)
