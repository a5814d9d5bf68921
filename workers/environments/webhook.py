"""An environment over signed HTTP (DESIGN.md §v2.1, the environment webhook protocol).

Each turn of a step, every live episode goes out in batches of `max_items_per_request` (one
`environment.step` body per batch), signed and retried exactly as reward requests are
(workers/webhook_calls.py), retries recorded as the run's `environment.retry` events. The
environment answers 200 with one result per episode it was sent; anything else (another status,
a body that is not JSON, a result that breaks the protocol, an episode answered twice, not at
all or not sent) fails the run at once with a message naming the URL, and for a result the
episode and the field.
"""

import secrets
from typing import Any

from pydantic import ValidationError

from service.contract.environments import (
    EnvironmentAnswer,
    EnvironmentStep,
    EpisodeItem,
    EpisodeResult,
    WebhookEnvironment,
)
from service.contract.limits import MAX_WEBHOOK_ID
from service.contract.outbound import OutboundClient
from workers.environments.base import EpisodeView, Reply
from workers.errors import RunError
from workers.rewards.webhook import WebhookContext, batch_name
from workers.webhook_calls import WebhookCaller


class WebhookEnvironmentClient:
    """The Environment of a spec's `environment: {type: webhook}`. Its retries are reported
    through ctx.on_retry: `WebhookContext.of_run(..., retry_event=EventType.ENVIRONMENT_RETRY)`
    records them as `environment.retry` events."""

    name = "webhook"

    def __init__(self, spec: WebhookEnvironment, ctx: WebhookContext) -> None:
        self.spec, self.ctx = spec, ctx
        self.caller = WebhookCaller(
            "environment webhook", spec.url, spec.timeout_s, spec.max_attempts, ctx
        )
        self._client: OutboundClient | None = None  # kept across turns: connections are reused

    def step(self, step: int, turn: int, episodes: list[EpisodeView], purpose: str) -> list[Reply]:
        if not episodes:
            return []
        if self._client is None:
            self._client = self.caller.client()
        client, run = self._client, self.ctx.run_id.removeprefix("run_")
        size, attempt = self.spec.max_items_per_request, secrets.token_hex(3)
        # Deterministic per step, turn and batch, with a tag new for each execution of the turn
        # (as reward requests'); a receiver deduplicates by episode_id and turn.
        prefix = f"rq_{run}_{batch_name(step, purpose)}_t{turn}"
        replies: dict[str, Reply] = {}
        for n, start in enumerate(range(0, len(episodes), size)):
            chunk = episodes[start : start + size]
            body = EnvironmentStep(
                request_id=f"{prefix}_{n}_{attempt}",
                run_id=self.ctx.run_id,
                step=step,
                turn=turn,
                purpose=purpose,
                items=[
                    EpisodeItem(
                        episode_id=e.episode_id,
                        group_id=e.group_id,
                        item=e.item,
                        messages=e.messages,
                    )
                    for e in chunk
                ],
            )
            answer = self._post(client, body.model_dump_json().encode(), body.request_id)
            replies.update(self._parse(answer, chunk))
        return [replies[e.episode_id] for e in episodes]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _post(self, client: OutboundClient, body: bytes, request_id: str) -> object:
        """One request, retried as webhooks are: the parsed JSON of its 200."""
        answer = self.caller.post(client, body, request_id)
        if answer.status != 200:
            raise RunError(
                f"environment webhook {self.spec.url} answered HTTP {answer.status} "
                f"({answer.text[:200]!r}); an environment must answer 200 with results"
            )
        return self.caller.json_of(answer)

    def _parse(self, answer: object, chunk: list[EpisodeView]) -> dict[str, Reply]:
        try:
            results = EnvironmentAnswer.model_validate(answer).results
        except ValidationError as exc:
            raise RunError(self._invalid(answer, exc)) from None
        sent = {e.episode_id for e in chunk}
        got: dict[str, Reply] = {}
        for i, result in enumerate(results):
            if result.episode_id in got:
                raise RunError(
                    f"environment webhook {self.spec.url} answered a second result for episode "
                    f"{result.episode_id}: results[{i}].episode_id"
                )
            if result.episode_id not in sent:
                raise RunError(
                    f"environment webhook {self.spec.url} answered a result for episode "
                    f"{result.episode_id!r}, which it was not sent: results[{i}].episode_id"
                )
            got[result.episode_id] = reply(result)
        if missing := [e.episode_id for e in chunk if e.episode_id not in got]:
            raise RunError(
                f"environment webhook {self.spec.url} answered no result for episode "
                f"{missing[0]}: results lacks {len(missing)} of the {len(chunk)} episodes it "
                f"was sent"
            )
        return got

    def _invalid(self, answer: object, exc: ValidationError) -> str:
        """The message for an answer that breaks the protocol: its first error, by episode."""
        error = exc.errors()[0]
        loc, where = error["loc"], _path(error["loc"])
        head = f"environment webhook {self.spec.url}"
        if len(loc) < 2 or loc[0] != "results":  # not one result's fault
            return f"{head} answered an invalid body: {where or 'body'}: {error['msg']}"
        raw = answer["results"][loc[1]]  # type: ignore[index]  # validated up to here
        episode = raw.get("episode_id") if isinstance(raw, dict) else None
        # the environment's own text: cut to the longest id that the protocol allows
        which = f"episode {episode[:MAX_WEBHOOK_ID]}" if isinstance(episode, str) else "an episode"
        return f"{head} answered an invalid result for {which}: {where}: {error['msg']}"


def reply(result: EpisodeResult) -> Reply:
    messages: list[dict[str, Any]] = [m.model_dump(exclude_none=True) for m in result.messages]
    return Reply(messages=messages, done=result.done, reward=result.reward)


def _path(loc: tuple) -> str:
    """("results", 3, "reward") -> "results[3].reward"."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out
