"""gvpo-client: the Python client of the gvpo-service REST API, and the webhook signatures
(gvpo_client.signing) that reward models check. It needs httpx alone: no torch, no vLLM."""

from gvpo_client.client import TERMINAL, ApiError, Client
from gvpo_client.signing import SignatureError, sign, verify

__all__ = ["TERMINAL", "ApiError", "Client", "SignatureError", "sign", "verify"]
