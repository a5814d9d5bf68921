"""Embeddings for `text_similarity`'s cosine metric, from the grader's `embeddings` endpoint: any
OpenAI-compatible POST {base_url}/embeddings.

The endpoint is a URL the user gave, so it is called as webhooks are (service/contract/outbound):
only public addresses unless private ones are allowed, each request pinned to the addresses
checked, no redirects, the answer read up to a cap. Network errors, 5xx and 429 are retried
with backoff; an endpoint that still fails, or answers something other than one embedding per
input, fails the run (RunError): it is infrastructure the run depends on, not one sample's
problem.
"""

import json
import os
import random
import time

import httpx

from service.contract.graders import EmbeddingEndpoint
from service.contract.outbound import OutboundClient, Refused, Transient, retry_after
from workers.errors import RunError
from workers.graders.base import GradingContext

BATCH = 64  # inputs per request
MAX_ANSWER_BYTES = 64 * 1024 * 1024  # 64 embeddings of a few thousand floats, as JSON text
TIMEOUT_S = 60.0
MAX_ATTEMPTS = 4
BACKOFF_BASE_S, BACKOFF_CAP_S = 0.5, 30.0


class Embedder:
    def __init__(self, endpoint: EmbeddingEndpoint, context: GradingContext) -> None:
        self.endpoint, self.context = endpoint, context
        self.url = endpoint.base_url.rstrip("/") + "/embeddings"
        self.headers = {"Content-Type": "application/json"}
        if name := endpoint.api_key_env:
            key = os.environ.get(name)
            if not key:
                raise RunError(
                    f"text_similarity embeddings: the worker has no environment variable "
                    f"{name} (embeddings.api_key_env) holding the key of {endpoint.base_url}"
                )
            self.headers["Authorization"] = f"Bearer {key}"

    def embed(self, texts: list[str]) -> list[list[float]]:
        """One embedding per text, in order (each distinct text asked for once)."""
        distinct = list(dict.fromkeys(texts))
        vectors: dict[str, list[float]] = {}
        settings = self.context.settings
        with OutboundClient(settings.webhook_allow_private, TIMEOUT_S) as client:
            for start in range(0, len(distinct), BATCH):
                chunk = distinct[start : start + BATCH]
                vectors.update(zip(chunk, self._request(client, chunk), strict=True))
        return [vectors[t] for t in texts]

    def _request(self, client: OutboundClient, chunk: list[str]) -> list[list[float]]:
        body = json.dumps({"model": self.endpoint.model, "input": chunk}).encode()
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                return self._parse(self._post(client, body), len(chunk))
            except Transient as exc:
                last = exc
            if attempt == MAX_ATTEMPTS:
                break
            delay = last.retry_after
            if delay is None:
                delay = random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempt - 1)))
            self.context.on_retry(
                f"embeddings endpoint {self.url} answered {last.answer}; retry {attempt} of "
                f"{MAX_ATTEMPTS - 1} in {delay:.1f} s",
                {"url": self.url, "answer": last.answer, "attempt": attempt, "delay_s": delay},
            )
            time.sleep(delay)
        raise RunError(
            f"embeddings endpoint {self.url} failed after {MAX_ATTEMPTS} tries; last answer: "
            f"{last.answer}"
        )

    def _post(self, client: OutboundClient, body: bytes) -> tuple[int, bytes]:
        """(status, body) of one POST; Transient for what is worth another try."""
        try:
            with client.stream("POST", self.url, headers=self.headers, content=body) as resp:
                raw = b""
                for part in resp.iter_bytes():
                    raw += part
                    if len(raw) > MAX_ANSWER_BYTES:
                        raise RunError(
                            f"embeddings endpoint {self.url} sent more than "
                            f"{MAX_ANSWER_BYTES} bytes"
                        )
        except Refused as exc:
            raise RunError(f"embeddings endpoint {self.url} may not be called: {exc}") from None
        except httpx.TransportError as exc:
            raise Transient(f"{type(exc).__name__}: {exc}") from None
        if resp.status_code >= 500 or resp.status_code == 429:
            raise Transient(
                f"HTTP {resp.status_code}: {raw[:200]!r}",
                retry_after(resp.headers.get("Retry-After")),
            )
        return resp.status_code, raw

    def _parse(self, answer: tuple[int, bytes], n: int) -> list[list[float]]:
        status, raw = answer
        shown = f"embeddings endpoint {self.url} (model {self.endpoint.model!r})"
        if status != 200:
            raise RunError(f"{shown} answered HTTP {status}: {raw[:300]!r}")
        try:
            data = json.loads(raw)["data"]
            ordered = sorted(data, key=lambda d: d.get("index", 0))
            vectors = [[float(x) for x in d["embedding"]] for d in ordered]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise RunError(
                f"{shown} answered what is not an OpenAI embeddings response "
                f"({{'data': [{{'embedding': [...], 'index': i}}]}}): {raw[:300]!r}"
            ) from None
        if len(vectors) != n:
            raise RunError(f"{shown} answered {len(vectors)} embeddings for {n} inputs")
        return vectors
