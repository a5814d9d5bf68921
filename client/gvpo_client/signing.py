"""Webhook signatures:
`GVPO-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`,
and the rule for reward values that both sides of the protocol apply.

The worker signs what it sends to reward models, reward models sign their async callbacks the
same way, and both sides check with `verify`. Reward models can import this module alone.
"""

import hashlib
import hmac
import math
import re
import secrets
import time

HEADER = "GVPO-Signature"
REQUEST_ID_HEADER = "GVPO-Request-Id"
TOLERANCE_S = 300
STAMP = re.compile(r"[0-9]{1,12}")
DIGEST = re.compile(r"[0-9a-f]{64}")


class SignatureError(ValueError):
    """The signature is missing, malformed, stale or wrong; the message says which."""


def is_reward(value: object) -> bool:
    """A reward in either direction of the protocol: a finite JSON number (not a boolean), one
    that a float holds (JSON integers have no limit: 10**400 is none)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer past the largest float
        return False


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def _digest(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The header value for `body`, signed now (or at `timestamp`)."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={_digest(secret, t, body)}"


def verify(
    secrets: str | list[str],
    header: str | None,
    body: bytes,
    tolerance_s: int = TOLERANCE_S,
    now: float | None = None,
) -> None:
    """Raise SignatureError unless `header` signs `body` with one of `secrets`, within tolerance.

    Several secrets are accepted during a rotation's grace period.
    """
    if not header:
        raise SignatureError(f"missing {HEADER} header")
    pairs = [part.strip().split("=", 1) for part in header.split(",") if "=" in part]
    stamps = [v for k, v in pairs if k == "t"]
    # Only what a signer writes: ASCII digits of a plausible time, and hex digests. Anything
    # else (a superscript digit, 400 digits, non-ASCII hex) is malformed, not a server error.
    signatures = [v for k, v in pairs if k == "v1" and DIGEST.fullmatch(v)]
    if len(stamps) != 1 or not STAMP.fullmatch(stamps[0]):
        raise SignatureError(f"malformed {HEADER} header: expected t=<unix seconds>,v1=<hex>")
    timestamp = int(stamps[0])
    if not signatures:
        raise SignatureError(f"malformed {HEADER} header: no v1 signature of 64 hex digits")
    age = (time.time() if now is None else now) - timestamp
    if abs(age) > tolerance_s:
        raise SignatureError(
            f"signature timestamp is {age:.0f} s from now (tolerance {tolerance_s} s)"
        )
    candidates = [secrets] if isinstance(secrets, str) else secrets
    for secret in candidates:
        expected = _digest(secret, timestamp, body)
        if any(hmac.compare_digest(expected, s) for s in signatures):
            return
    raise SignatureError("signature does not match the body")
