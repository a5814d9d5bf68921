"""The ASGI middleware every vLLM server of an inference worker runs (`--middleware`): only
requests with the serve token pass, on every route but /health. vLLM's own `--api-key` guards
the OpenAI routes only, and leaves its weight and pause routes (/collective_rpc, /pause, ...)
open to anyone who can reach the port.

It also ends the server with its inference worker: a server runs in a process group of its own
(so that stopping it stops its engine process too), which the worker's own end, however it came
(SIGKILL included), would leave running with no one to route to it. A thread watches the
server's parent; once it has gone, the server's whole group is terminated.
"""

import os
import secrets
import signal
import threading
import time

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

TOKEN_VARIABLE = "GVPO_SERVE_TOKEN"
OPEN = ("/health",)  # the worker's own readiness check


PARENT_CHECK_S = 1.0


def _end_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os.killpg(os.getpgrp(), signal.SIGTERM)


class RequireServeToken:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.expected = f"Bearer {os.environ[TOKEN_VARIABLE]}".encode()
        if os.getpgrp() == os.getpid():  # a server the worker started in a group of its own
            watch = threading.Thread(
                target=_end_with_parent, args=(os.getppid(),), name="gvpo-parent", daemon=True
            )
            watch.start()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and scope["path"] not in OPEN:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                refusal = JSONResponse({"error": "an inference worker's model"}, status_code=401)
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)
