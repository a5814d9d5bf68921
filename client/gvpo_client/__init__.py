"""gvpo-client: the Python client of the gvpo-service REST API (Client), the types of its
answers (gvpo_client.schemas), and the webhook signatures that reward models check
(gvpo_client.signing). It needs httpx alone: no torch, no vLLM, no web framework."""

from gvpo_client.client import TERMINAL, ApiError, Client
from gvpo_client.signing import HEADER, SignatureError, is_reward, new_secret, sign, verify

__all__ = [
    "HEADER",
    "TERMINAL",
    "ApiError",
    "Client",
    "SignatureError",
    "is_reward",
    "new_secret",
    "sign",
    "verify",
]
