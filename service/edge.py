"""Checks on a request before any route sees it (an ASGI middleware): what no route could
accept is refused here with the API's error body, whatever the route.

- NUL (%00) in the path or the query string: a 400 naming it. (PostgreSQL cannot hold NUL in
  text, so an id with one would otherwise fail in the database as a server error.)
- Security headers on every answer: no page of ours may be framed by another site
  (clickjacking), content types are not sniffed, no referrer leaves; and the dashboard runs
  under a content security policy that allows only its own files (it loads nothing else: its
  chart library is vendored), so injected markup could neither run script nor send data out.
"""

from urllib.parse import unquote_to_bytes

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

EVERY_ANSWER = [
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
DASHBOARD_POLICY = (
    b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    b"frame-ancestors 'none'"
)


def _refusal(message: str) -> JSONResponse:
    body = {"error": {"code": "bad_request", "message": message, "details": {}}}
    return JSONResponse(body, status_code=400)


class Edge:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = EVERY_ANSWER
        if scope["path"].startswith("/dashboard"):
            headers = [*headers, (b"content-security-policy", DASHBOARD_POLICY)]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *headers]
            await send(message)

        if problem := _problem(scope):
            await _refusal(problem)(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)


def _problem(scope: Scope) -> str | None:
    if "\x00" in scope["path"]:
        return "the path contains the NUL character (%00), which no id or name may hold"
    if b"\x00" in unquote_to_bytes(scope.get("query_string", b"")):
        return "the query string contains the NUL character (%00), which no parameter may hold"
    return None
