"""Outbound safety for webhooks (reward models, run notifications): only http(s) URLs whose
host resolves to public addresses, unless private addresses are allowed (embedded use, tests);
and the optional reachability probe of a reward model at submission."""

import ipaddress
import socket
from urllib.parse import urlsplit

import httpx


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
        address = ipaddress.ip_address(sockaddr[0])
        if not address.is_global or address.is_multicast:
            return (f"host {parts.hostname!r} resolves to {address}, a loopback, private, "
                    "link-local or reserved address; webhook URLs must be public "
                    "(GVPO_WEBHOOK_ALLOW_PRIVATE=true allows them)")
    return None


PROBE_TIMEOUT_S = 5.0


def unreachable(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why `url` cannot be reached (no connection, no answer in time), or None when it answers
    with any HTTP status: a HEAD request, which carries no data and needs no signature."""
    try:
        httpx.head(url, timeout=timeout_s, follow_redirects=False)
    except httpx.HTTPError as exc:
        return (f"the reward model at {url!r} could not be reached within {timeout_s:g} s "
                f"({type(exc).__name__}: {exc}); check the URL, or leave probe off")
    return None
