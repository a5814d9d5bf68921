"""Calling one of a run's webhooks (its reward model, its environment): a signed POST retried as
DESIGN.md's webhook protocols say, in one place for every such client.

Each request is signed with the run's secret (read per request: a rotation takes effect at
once) and carries GVPO-Request-Id. Network errors, timeouts, 5xx and 429 are retried with
exponential backoff and full jitter, honouring Retry-After, up to `max_attempts` tries, each
retry reported through `on_retry`; an answer past the size cap, a URL that may not be called
and running out of tries fail the run (RunError) with a message naming the webhook's URL.
What any other answer means is the client's rule.
"""

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gvpo_client.signing import REQUEST_ID_HEADER
from service.contract.outbound import Answer, OutboundClient, Refused, Transient, post_signed
from workers.errors import RunError

BACKOFF_BASE_S, BACKOFF_CAP_S = 0.5, 30.0


def backoff(attempt: int, retry_after: float | None = None) -> float:
    """Seconds to wait after failed try `attempt` (1, 2, ...): the server's Retry-After, else
    exponential backoff with full jitter. A judge's retries (workers/graders/judge.py) wait
    the same way."""
    if retry_after is not None:
        return retry_after
    return random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempt - 1)))


class RunSide(Protocol):
    """What a call needs from its run (workers.rewards.webhook.WebhookContext has it)."""

    secret: Callable[[], str]
    allow_private: bool
    max_response_bytes: int
    on_retry: Callable[[str, dict], None]  # (message, data) -> records an event
    on_call: Callable[[], None]  # counts a request sent, in the run's usage
    sleep: Callable[[float], None]


@dataclass(frozen=True)
class WebhookCaller:
    """How one webhook of a run is called."""

    kind: str  # "reward webhook", "environment webhook": what every message calls it
    url: str
    timeout_s: float  # per request
    max_attempts: int
    run: RunSide

    def client(self) -> OutboundClient:
        return OutboundClient(self.run.allow_private, self.timeout_s)

    def post(self, client: OutboundClient, body: bytes, request_id: str) -> Answer:
        """POST `body` until an answer is neither a network error nor retryable; that answer."""
        tries = self.max_attempts
        for attempt in range(1, tries + 1):
            try:
                return self._post_once(client, body, request_id)
            except Transient as exc:
                last = exc
            except Refused as exc:
                raise RunError(f"{self.kind} {self.url} may not be called: {exc}") from None
            if attempt == tries:
                break
            delay = backoff(attempt, last.retry_after)
            self.run.on_retry(
                f"{self.kind} {self.url} answered {last.answer}; retry {attempt} of {tries - 1} "
                f"in {delay:.1f} s",
                {
                    "url": self.url,
                    "answer": last.answer,
                    "attempt": attempt,
                    "delay_s": delay,
                    "request_id": request_id,
                },
            )
            self.run.sleep(delay)
        raise RunError(
            f"{self.kind} {self.url} failed after {tries} tries; last answer: {last.answer}"
        )

    def _post_once(self, client: OutboundClient, body: bytes, request_id: str) -> Answer:
        self.run.on_call()
        answer = post_signed(
            client,
            self.url,
            body,
            self.run.secret(),
            {REQUEST_ID_HEADER: request_id},
            self.run.max_response_bytes,
            self.timeout_s,
        )
        if answer.over_limit:
            raise RunError(
                f"{self.kind} {self.url} sent more than {self.run.max_response_bytes} bytes"
            )
        if answer.retryable:
            raise Transient(answer.describe(), answer.retry_after)
        return answer

    def json_of(self, answer: Answer) -> object:
        """The JSON of a 200 answer's body."""
        try:
            return json.loads(answer.text)
        except json.JSONDecodeError:
            raise RunError(
                f"{self.kind} {self.url} answered 200 with a body that is "
                f"not JSON: {answer.text[:200]!r}"
            ) from None
