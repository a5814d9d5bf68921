"""Outbound safety for webhooks (reward models, run notifications): only http(s) URLs whose
host resolves to public addresses, unless private addresses are allowed (embedded use, tests)."""

import ipaddress
import socket
from urllib.parse import urlsplit


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
