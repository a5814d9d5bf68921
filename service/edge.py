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

And how the server reads requests (SERVER, for uvicorn): with httptools' parser, which costs a
fraction of h11's per request and per streamed chunk, and a request head (request line and
headers) past MAX_HEAD_BYTES refused with a 431 as it arrives. httptools itself has no such
limit: one 40 MB header line held the server up for everyone.
"""

import json
import re
from urllib.parse import unquote_to_bytes

import uvicorn
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.config import Settings

MAX_HEAD_BYTES = 64 * 1024
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


class LimitedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with a limit on the request head. While a head is being
    read, the parser is fed no more than the limit allows; past it the request is answered 431
    and the connection closed, so no header is ever held beyond MAX_HEAD_BYTES (plus the rest
    of one read that also ended the request before it)."""

    head_read: int | None = 0  # bytes of the current request head fed; None: in a body

    def connection_made(self, transport) -> None:
        self.head_read = 0
        super().connection_made(transport)

    def on_headers_complete(self) -> None:
        self.head_read = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self.head_read = 0  # what follows is the next request's head
        super().on_message_complete()

    def data_received(self, data: bytes) -> None:
        while self.head_read is not None and data:
            room = MAX_HEAD_BYTES - self.head_read
            if room <= 0:
                self._refuse_head()
                return
            piece, data = data[:room], data[room:]
            self.head_read += len(piece)
            super().data_received(piece)
            if self.parser is None or self.transport.is_closing():
                return
        if data:
            super().data_received(data)

    def _refuse_head(self) -> None:
        message = (
            f"the request head (request line and headers) is larger than the "
            f"{MAX_HEAD_BYTES}-byte limit"
        )
        body = json.dumps(
            {"error": {"code": "headers_too_large", "message": message, "details": {}}}
        ).encode()
        self.logger.warning("a request head past %d bytes: refused (431)", MAX_HEAD_BYTES)
        head = [b"HTTP/1.1 431 Request Header Fields Too Large\r\n"]
        for name, value in [*self.server_state.default_headers, *EVERY_ANSWER]:
            head.append(name + b": " + value + b"\r\n")
        head.append(b"content-type: application/json\r\n")
        head.append(b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        self.transport.write(b"".join(head) + body)
        self.transport.close()


# How the API's HTTP server runs (uvicorn.run / uvicorn.Config keywords).
SERVER = {"http": LimitedHttpTools}


def serve(app: ASGIApp, host: str, port: int) -> None:
    """Serve `app` as `gvpo api` serves the API: one uvicorn process, uvicorn's default event
    loop (uvloop when installed), SERVER's HTTP protocol, the access log on. (The API benchmark
    serves its bare app through this too, so both run under the same server settings.)"""
    uvicorn.run(app, host=host, port=port, log_level="info", **SERVER)
