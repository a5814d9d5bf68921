"""Calling webhooks safely, shared by reward webhooks and environments (the worker) and run
notifications (the API's notifier).

- Which URLs may be called: only http(s) URLs whose host resolves to public addresses, unless
  private addresses are allowed (embedded use, tests); and the optional reachability probe of
  a reward model at submission.
- One signed POST: the body is signed with the run's secret, redirects are not followed (the
  caller's client is built with follow_redirects=False), the answer is read up to a size cap and
  a deadline, and network errors and timeouts come back as `Transient`.

What an answer means (which statuses are final, how long to back off) is the caller's rule.
"""

import email.utils
import ipaddress
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from service.contract.signing import HEADER, sign

RETRY_AFTER_CAP_S = 300.0


class Transient(Exception):
    """An outcome worth retrying; carries what to report and an optional Retry-After (s)."""

    def __init__(self, answer: str, retry_after: float | None = None) -> None:
        super().__init__(answer)
        self.answer, self.retry_after = answer, retry_after


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
    client: httpx.Client,
    url: str,
    body: bytes,
    secret: str,
    headers: dict[str, str],
    max_bytes: int,
    timeout_s: float,
) -> Answer:
    """POST `body` to `url` signed with `secret`; the answer, whatever its status.

    Raises Transient on a network error, or when no complete answer came within `timeout_s`.
    """
    headers = {"Content-Type": "application/json", HEADER: sign(secret, body), **headers}
    deadline = time.monotonic() + timeout_s
    try:
        with client.stream("POST", url, content=body, headers=headers) as resp:
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


def webhook_url_problem(url: str, allow_private: bool) -> str | None:
    """Why `url` may not be called, or None if it may. Resolves the host (DNS) to check it."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{url!r} is not an http(s) URL with a host"
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        return f"host {parts.hostname!r} does not resolve ({exc})"
    if allow_private:
        return None
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0].split("%")[0])
        if not public(address):
            return (
                f"host {parts.hostname!r} resolves to {address}, a loopback, private, "
                "link-local or reserved address (or an IPv6 form of one); webhook URLs must be "
                "public (GVPO_WEBHOOK_ALLOW_PRIVATE=true allows them)"
            )
    return None


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


PROBE_TIMEOUT_S = 5.0


def unreachable(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why `url` cannot be reached (no connection, no answer in time), or None when it answers
    with any HTTP status: a HEAD request, which carries no data and needs no signature."""
    try:
        httpx.head(url, timeout=timeout_s, follow_redirects=False)
    except httpx.HTTPError as exc:
        return (
            f"the reward model at {url!r} could not be reached within {timeout_s:g} s "
            f"({type(exc).__name__}: {exc}); check the URL, or leave probe off"
        )
    return None
