"""Checks on a request before any route sees it (an ASGI middleware): what no route could
accept is refused here with the API's error body, whatever the route.

- NUL (%00) in the path or the query string: a 400 naming it. (PostgreSQL cannot hold NUL in
  text, so an id with one would otherwise fail in the database as a server error.)
"""

from urllib.parse import unquote_to_bytes

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send


def _refusal(message: str) -> JSONResponse:
    body = {"error": {"code": "bad_request", "message": message, "details": {}}}
    return JSONResponse(body, status_code=400)


class Edge:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (problem := _problem(scope)):
            await _refusal(problem)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _problem(scope: Scope) -> str | None:
    if "\x00" in scope["path"]:
        return "the path contains the NUL character (%00), which no id or name may hold"
    if b"\x00" in unquote_to_bytes(scope.get("query_string", b"")):
        return "the query string contains the NUL character (%00), which no parameter may hold"
    return None
