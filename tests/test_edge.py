"""What every request meets before a route (service/edge.py): NUL in a path or query is a 400
naming it, a body past its limit a 413, a request head past 64 KiB a 431, and every answer
carries the security headers, the dashboard its content policy."""

import json
import socket

import httpx
import pytest

from factories import assert_error, auth
from services import serve_api


@pytest.mark.both_backends
@pytest.mark.parametrize(
    "path", ["/v1/runs/run_a%00b", "/v1/files/file_%00", "/v1/runs/run_x/events?after=1%00"]
)
def test_nul_in_an_id_or_a_query_is_a_400_naming_it(api, make_key, path):
    assert_error(api.get(path, headers=auth(make_key())), 400, "bad_request", "NUL")


@pytest.mark.parametrize("path", ["/dashboard/", "/dashboard/app.js", "/healthz", "/v1/runs"])
def test_no_page_can_be_framed_and_the_dashboard_loads_only_its_own_files(api, path):
    headers = api.get(path).headers
    assert headers["x-frame-options"] == "DENY"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    policy = headers.get("content-security-policy", "")
    if path.startswith("/dashboard"):
        assert "frame-ancestors 'none'" in policy and "default-src 'self'" in policy
        assert "unsafe-inline" not in policy and "unsafe-eval" not in policy


def _head_only(port: int, path: str, key: str, length: int, body: bytes = b"") -> bytes:
    """Send a POST's head declaring `length` bytes, then only `body`, and read the answer: a
    server that waited for the rest would not answer before the timeout."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as conn:
        conn.sendall(
            f"POST {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n".encode()
            + body
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer


WAIT_S = 60  # a loaded machine's worst answer time; a server waiting for 2 GiB never answers


@pytest.mark.both_backends
@pytest.mark.parametrize(
    "path", ["/v1/files", "/v1/runs", "/v1/runs/run_x/rewards", "/v1/runs/run_x/groups"]
)
def test_a_declared_2_gib_body_is_refused_before_any_of_it_is_read(settings, make_key, path):
    with serve_api(settings) as live:
        answer = _head_only(live.api_port, path, make_key(), 2 * 2**30)
    status_line = answer.split(b"\r\n", 1)[0]
    assert status_line.endswith(b"413 Request Entity Too Large"), answer[:300]


@pytest.mark.both_backends
def test_a_body_streamed_past_the_limit_is_refused_once_it_passes(settings, make_key):
    """No Content-Length (chunked): the body is counted as it arrives."""

    def chunks():  # 4 MiB of JSON whitespace: read whole, it would be a 422, not a 413
        for _ in range(64):
            yield b" " * (64 * 1024)

    with serve_api(settings, max_request_bytes=1024 * 1024) as live:
        resp = httpx.post(
            f"http://127.0.0.1:{live.api_port}/v1/runs",
            headers={**auth(make_key()), "Content-Type": "application/json"},
            content=chunks(),
            timeout=WAIT_S,
        )
    assert_error(resp, 413, "payload_too_large", "1048576-byte limit")


def test_a_huge_header_is_refused_and_others_are_answered_meanwhile(settings):
    """A 40 MB header line: the server refuses the request once its head passes 64 KiB, and
    answers other clients all the while."""
    with (
        serve_api(settings) as live,
        socket.create_connection(("127.0.0.1", live.api_port), timeout=WAIT_S) as hostile,
    ):
        hostile.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Big: ")
        refused = False
        try:
            for _ in range(40 * 16):  # 40 MB in 64 KiB pieces, unless the server hangs up
                hostile.sendall(b"a" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            refused = True
        answer = b"" if refused else hostile.recv(65536)
        assert refused or answer.startswith(b"HTTP/1.1 4"), answer[:200]
        other = httpx.get(f"http://127.0.0.1:{live.api_port}/healthz", timeout=WAIT_S)
        assert other.status_code == 200


def _answer(conn: socket.socket, pending: bytearray) -> tuple[bytes, bytes]:
    """The next answer on a keep-alive connection: (its status line, its body)."""
    while b"\r\n\r\n" not in pending:
        chunk = conn.recv(65536)
        assert chunk, bytes(pending[:300])
        pending += chunk
    head, _, rest = bytes(pending).partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(rest) < length:
        rest += conn.recv(65536)
    pending[:] = rest[length:]
    return head.split(b"\r\n", 1)[0], rest[:length]


def test_only_a_request_head_counts_against_its_limit_and_past_it_is_a_431(settings, make_key):
    """On one connection: a 200 KB body sent with its head, a head just under 64 KiB, then
    one past it, which is refused with the limit named and the connection closed."""
    key = make_key()
    post = f"POST /v1/runs HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {key}\r\n"
    body = b"{" + b" " * 200_000 + b"}"  # JSON whitespace: an empty spec, a 422
    with (
        serve_api(settings) as live,
        socket.create_connection(("127.0.0.1", live.api_port), timeout=WAIT_S) as conn,
    ):
        pending = bytearray()
        conn.sendall(
            f"{post}Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert _answer(conn, pending)[0].startswith(b"HTTP/1.1 422 ")
        conn.sendall(
            f"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Big: {'a' * 65_000}\r\n\r\n".encode()
        )
        assert _answer(conn, pending)[0] == b"HTTP/1.1 200 OK"
        conn.sendall(
            f"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Big: {'a' * 66_000}\r\n\r\n".encode()
        )
        status, answer = _answer(conn, pending)
        assert status == b"HTTP/1.1 431 Request Header Fields Too Large"
        assert "65536-byte limit" in json.loads(answer)["error"]["message"]
        assert conn.recv(65536) == b""  # closed


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000 + b"]" * 100_000, b'{"training": {"steps": ' + b"9" * 5000 + b"}}"],
    ids=["deep", "5000-digit number"],
)
@pytest.mark.parametrize("path", ["/v1/runs", "/v1/runs/run_x/groups", "/v1/gvpo:dry_run"])
def test_json_no_request_could_be_is_a_4xx(api, make_key, body, path):
    headers = {**auth(make_key()), "Content-Type": "application/json"}
    resp = api.post(path, content=body, headers=headers)
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:300])
