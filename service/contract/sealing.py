"""Secrets at rest: the database keeps a run's webhook secrets only encrypted.

Both sides need the plain secret (the API verifies callbacks and signs notifications, the
worker signs reward requests), so it is encrypted, not hashed: Fernet (AES-128-CBC with an
HMAC-SHA256 tag, from `cryptography`), so a row altered in the database fails to open rather
than yielding a different secret.

The keys come from settings (GVPO_ENCRYPTION_KEY): any random string of 32 characters or
more, turned into a Fernet key with HKDF-SHA256. Several keys, newest first, rotate the key:
new secrets are sealed with the first, and a secret sealed under any listed key still opens;
`reseal` moves a stored secret to the first key, after which the older keys can be dropped.
"""

import base64
from collections.abc import Sequence
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SETTING = "GVPO_ENCRYPTION_KEY"
# Binds derived keys to this use: the same operator string used elsewhere yields another key.
_INFO = b"gvpo-service: secrets at rest, v1"
MAX_OPENED = 4096  # secrets kept opened per Sealer


class SealingError(RuntimeError):
    """A stored secret cannot be opened (a wrong or missing key), or no key is configured."""


def _fernet(key: str) -> Fernet:
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(key.encode())
    return Fernet(base64.urlsafe_b64encode(derived))


class Sealer:
    """Seals and opens secrets under `keys` (newest first)."""

    def __init__(self, keys: Sequence[str]) -> None:
        if not keys or not all(keys):
            raise SealingError(f"{SETTING} holds no key")
        self._fernet = MultiFernet([_fernet(k) for k in keys])
        # A run's secret is opened for every callback of the run: the clear text of the ones
        # opened last is kept (this process holds the keys that open them anyway).
        self._opened: dict[str, str] = {}

    def seal(self, secret: str) -> str:
        return self._fernet.encrypt(secret.encode()).decode()

    def open(self, sealed: str) -> str:
        if (secret := self._opened.get(sealed)) is not None:
            return secret
        try:
            secret = self._fernet.decrypt(sealed.encode()).decode()
        except InvalidToken:
            raise SealingError(
                f"a stored secret does not open with the keys in {SETTING}: it was sealed "
                "under another key (list the old key after the new one while a key rotation "
                "is under way), or the stored value was altered"
            ) from None
        if len(self._opened) >= MAX_OPENED:
            self._opened.clear()
        self._opened[sealed] = secret
        return secret

    def reseal(self, sealed: str) -> str:
        """`sealed` under the newest key."""
        self.open(sealed)  # the same clear error for a value no listed key opens
        return self._fernet.rotate(sealed.encode()).decode()


@lru_cache(maxsize=8)
def sealer_for(keys: tuple[str, ...]) -> Sealer:
    """One Sealer per key list: key derivation runs once, not per secret."""
    return Sealer(keys)
