"""Calling a URL that a user gave (reward webhooks and environments on the worker, run
notifications in the API, the reachability probe at submission) safely, in one place: every
such call goes through an `OutboundClient`.

- Which URLs may be called: only http(s) URLs whose host resolves to public addresses, unless
  private addresses are allowed (embedded use, tests).
- Where the call goes: the host is resolved once per request, every address it resolves to is
  checked, and the connection goes to a checked address (`pin`). A second lookup at connect
  time would let a DNS server answer a public address to the check and a private one to the
  connection (DNS rebinding). The request still carries the URL's Host header and, for https,
  its server name for SNI and certificate verification.
- One POST, signed with the run's secret (webhooks) or carrying the caller's headers (a
  judge's key): redirects are not followed, the answer is read up to a size cap and a
  deadline, and network errors, timeouts and failed lookups come back as `Transient`; a URL
  that may not be called raises `Refused`.
- A client may be shared by threads (a judge's concurrent requests).

What an answer means (which statuses are final, how long to back off) is the caller's rule.
"""

import email.utils
import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

from gvpo_client.signing import HEADER, sign

RETRY_AFTER_CAP_S = 300.0
PROBE_TIMEOUT_S = 5.0

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Transient(Exception):
    """An outcome worth retrying; carries what to report and an optional Retry-After (s)."""

    def __init__(self, answer: str, retry_after: float | None = None) -> None:
        super().__init__(answer)
        self.answer, self.retry_after = answer, retry_after


class Refused(Exception):
    """The URL may not be called: not http(s), or its host resolves to a non-public address
    while private addresses are not allowed. The message says which."""


@dataclass(frozen=True)
class Target:
    """Where one request goes: the URL as given, and every address its host resolved to, all
    checked, in the resolver's order of preference."""

    url: httpx.URL
    addresses: tuple[IPAddress, ...]

    def request(
        self,
        client: httpx.Client,
        address: IPAddress,
        method: str,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
    ) -> httpx.Request:
        """`method` to the URL with its host replaced by `address` (IPv6 in brackets): the
        Host header names the URL's host, and for https so does TLS (SNI, and the name the
        certificate is verified against: httpx's `sni_hostname` extension)."""
        extensions = {}
        if self.url.scheme == "https":
            extensions["sni_hostname"] = self.url.raw_host.decode("ascii")
        return client.build_request(
            method,
            self.url.copy_with(host=str(address)),
            headers={**(headers or {}), "Host": self.url.netloc.decode("ascii")},
            content=content,
            extensions=extensions,
        )


def pin(url: str, allow_private: bool) -> Target:
    """`url`'s host resolved once, each address checked. Raises Refused when the URL may not
    be called, Transient when the host does not resolve (the resolver may answer later)."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise Refused(f"{url!r} is not an http(s) URL with a host ({exc})") from None
    if parsed.scheme not in ("http", "https") or not parsed.raw_host:
        raise Refused(f"{url!r} is not an http(s) URL with a host")
    if parsed.userinfo:  # it would be kept in the run's spec and shown with it
        raise Refused(
            "the URL carries credentials (user:password@), which would be stored and shown "
            "with the run's spec: drop them and check the GVPO-Signature header instead"
        )
    host = parsed.raw_host.decode("ascii")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise Transient(f"host {host!r} does not resolve ({exc})") from None
    # A scope (fe80::1%eth0) is dropped: such an address is link-local, never public.
    addresses = tuple(
        dict.fromkeys(
            ipaddress.ip_address(str(sockaddr[0]).split("%")[0]) for *_, sockaddr in infos
        )
    )
    if not allow_private:
        for address in addresses:
            if not public(address):
                raise Refused(
                    f"host {host!r} resolves to {address}, a loopback, private, link-local or "
                    "reserved address (or an IPv6 form of one); webhook URLs must be public "
                    "(GVPO_WEBHOOK_ALLOW_PRIVATE=true allows them)"
                )
    return Target(parsed, addresses)


def webhook_url_problem(url: str, allow_private: bool) -> str | None:
    """Why `url` may not be called, or None if it may (the check at submission; each call
    checks again, see `pin`)."""
    try:
        pin(url, allow_private)
    except Refused as exc:
        return str(exc)
    except Transient as exc:
        return exc.answer
    return None


class OutboundClient:
    """HTTP to URLs that users gave: each request is pinned (see `pin`), redirects are not
    followed, and proxies named in the environment are not used (a proxy would look the host
    up again itself). Certificates are verified as httpx does by default (SSL_CERT_FILE and
    SSL_CERT_DIR are honoured)."""

    def __init__(self, allow_private: bool, timeout_s: float) -> None:
        self.allow_private, self.timeout_s = allow_private, timeout_s
        self._clients: dict[bytes, httpx.Client] = {}
        self._lock = threading.Lock()

    def _client(self, host: bytes) -> httpx.Client:
        # One connection pool per host name: httpx keys kept-alive connections by address,
        # and a TLS session verified for one name must not carry another name's requests.
        with self._lock:
            if host not in self._clients:
                self._clients[host] = httpx.Client(
                    transport=httpx.HTTPTransport(),  # an explicit transport: no proxy from env
                    timeout=self.timeout_s,
                    follow_redirects=False,
                )
            return self._clients[host]

    @contextmanager
    def stream(
        self,
        method: str,
        url: str,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
    ) -> Iterator[httpx.Response]:
        """The response of `method` to `url`, its body not read yet. Raises Refused, Transient
        (no lookup), or httpx errors. Checked addresses are tried in order until one connects,
        as a connection to the host name would be."""
        target = pin(url, self.allow_private)
        client = self._client(target.url.raw_host)
        for i, address in enumerate(target.addresses):
            request = target.request(client, address, method, headers=headers, content=content)
            try:
                response = client.send(request, stream=True)
                break
            except httpx.ConnectError:
                if i == len(target.addresses) - 1:
                    raise
        try:
            yield response
        finally:
            response.close()

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    def __enter__(self) -> "OutboundClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


@dataclass(frozen=True)
class Answer:
    status: int
    text: str  # the body, up to the cap
    over_limit: bool  # the body was longer than the cap (the rest was not read)
    retry_after: float | None

    @property
    def retryable(self) -> bool:
        return self.status >= 500 or self.status == 429

    def describe(self) -> str:
        return f"HTTP {self.status}: {self.text[:200]!r}"


def post_signed(
    client: OutboundClient,
    url: str,
    body: bytes,
    secret: str,
    headers: dict[str, str],
    max_bytes: int,
    timeout_s: float,
) -> Answer:
    """POST `body` to `url` signed with `secret`; the answer, whatever its status.

    Raises Refused when `url` may not be called, Transient on a failed lookup or network
    error, or when no complete answer came within `timeout_s`.
    """
    signed = {HEADER: sign(secret, body), **headers}
    return post_json(client, url, body, signed, max_bytes, timeout_s)


def post_json(
    client: OutboundClient,
    url: str,
    body: bytes,
    headers: dict[str, str],
    max_bytes: int,
    timeout_s: float,
) -> Answer:
    """POST the JSON `body` to `url` with `headers`; the answer, whatever its status. Raises
    as post_signed does."""
    headers = {"Content-Type": "application/json", **headers}
    deadline = time.monotonic() + timeout_s
    try:
        with client.stream("POST", url, headers=headers, content=body) as resp:
            raw, over = _read_capped(resp, max_bytes, deadline, timeout_s)
    except httpx.TransportError as exc:
        raise Transient(f"{type(exc).__name__}: {exc}") from None
    return Answer(
        resp.status_code,
        raw.decode("utf-8", "replace"),
        over,
        retry_after(resp.headers.get("Retry-After")),
    )


def _read_capped(
    resp: httpx.Response, cap: int, deadline: float, timeout_s: float
) -> tuple[bytes, bool]:
    chunks, size = [], 0
    for chunk in resp.iter_bytes():
        size += len(chunk)
        if size > cap:
            return b"".join(chunks), True
        if time.monotonic() > deadline:
            raise Transient(f"no complete answer within timeout_s={timeout_s:g}")
        chunks.append(chunk)
    return b"".join(chunks), False


def retry_after(value: str | None) -> float | None:
    """Retry-After as seconds or an HTTP date; capped so a hostile server cannot stall us."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), RETRY_AFTER_CAP_S)


# IPv6 ranges that carry an IPv4 address in their last 32 bits: NAT64's well-known prefix and
# the deprecated IPv4-compatible form. NAT64's local-use prefix (RFC 8215) is never public.
_LAST_32_BITS = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("::/96"))
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")


def public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether `address` is a public unicast address: for IPv6, also every IPv4 address it
    embeds or maps to (IPv4-mapped, 6to4, Teredo, NAT64, IPv4-compatible) must be public, or
    a gateway would carry the call to a private one."""
    if not address.is_global or address.is_multicast:
        return False
    if isinstance(address, ipaddress.IPv4Address):
        return True
    if address in _NAT64_LOCAL:
        return False
    embedded = [address.ipv4_mapped, address.sixtofour, *(address.teredo or ())]
    embedded += [
        ipaddress.IPv4Address(address.packed[12:]) for net in _LAST_32_BITS if address in net
    ]
    return all(public(v4) for v4 in embedded if v4 is not None)


def unreachable(url: str, allow_private: bool, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why `url` cannot be reached (no connection, no answer in time), or None when it answers
    with any HTTP status: a HEAD request, which carries no data and needs no signature."""
    try:
        with OutboundClient(allow_private, timeout_s) as client, client.stream("HEAD", url):
            pass
    except (httpx.HTTPError, Refused) as exc:
        why = f"{type(exc).__name__}: {exc}"
    except Transient as exc:
        why = exc.answer
    else:
        return None
    return (
        f"the reward model at {url!r} could not be reached within {timeout_s:g} s "
        f"({why}); check the URL, or leave probe off"
    )
