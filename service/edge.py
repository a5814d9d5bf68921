"""Checks on a request before any route sees it (an ASGI middleware): what no route could
accept is refused here with the API's error body, whatever the route.

- NUL (%00) in the path or the query string: a 400 naming it. (PostgreSQL cannot hold NUL in
  text, so an id with one would otherwise fail in the database as a server error.)
- Bodies past their limit: a 413, from Content-Length before any of the body is read, else as
  soon as the body streamed in passes it (uploads: GVPO_MAX_UPLOAD_BYTES; reward callbacks:
  GVPO_MAX_CALLBACK_BYTES; anything else: GVPO_MAX_REQUEST_BYTES).
- Security headers on every answer: no page of ours may be framed by another site
  (clickjacking), content types are not sniffed, no referrer leaves; and the dashboard runs
  under a content security policy that allows only its own files (it loads nothing else: its
  chart library is vendored), so injected markup could neither run script nor send data out.
"""

import re
from urllib.parse import unquote_to_bytes

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.config import Settings

# How the API's HTTP server runs: h11, whose parser refuses a request head (request line and
# headers) past this size with a 431-class error; httptools, uvicorn's faster default, has no
# such limit, and one 40 MB header held the server up for everyone.
SERVER = {"http": "h11", "h11_max_incomplete_event_size": 64 * 1024}

MULTIPART_OVERHEAD = 1024 * 1024  # an upload's form fields and part headers around the file
CALLBACK = re.compile(r"^/v1/runs/[^/]+/rewards$")

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


def _refusal(message: str, status: int = 400, code: str = "bad_request") -> JSONResponse:
    body = {"error": {"code": code, "message": message, "details": {}}}
    return JSONResponse(body, status_code=status)


class TooLarge(HTTPException):
    """A body past its limit (413); raised from inside the app when the streamed body passes
    it, so that whatever was reading stops at once."""

    def __init__(self, limit: int, what: str) -> None:
        super().__init__(413, f"{what} is larger than the {limit}-byte limit")


class Edge:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app, self.settings = app, settings

    def _limit(self, scope: Scope) -> tuple[int, str]:
        path = scope["path"]
        if path.rstrip("/") == "/v1/files":
            return self.settings.max_upload_bytes + MULTIPART_OVERHEAD, "the upload"
        if CALLBACK.match(path):
            return self.settings.max_callback_bytes, "the callback body"
        return self.settings.max_request_bytes, "the request body"

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
        limit, what = self._limit(scope)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            too_large = TooLarge(limit, what)
            await _refusal(too_large.detail, 413, "payload_too_large")(
                scope, receive, send_with_headers
            )
            return
        read = 0

        async def limited() -> Message:
            nonlocal read
            message = await receive()
            read += len(message.get("body", b""))
            if read > limit:
                raise TooLarge(limit, what)
            return message

        await self.app(scope, limited, send_with_headers)


def _problem(scope: Scope) -> str | None:
    if "\x00" in scope["path"]:
        return "the path contains the NUL character (%00), which no id or name may hold"
    if b"\x00" in unquote_to_bytes(scope.get("query_string", b"")):
        return "the query string contains the NUL character (%00), which no parameter may hold"
    return None
