"""Rewards from an external reward model over signed HTTP (DESIGN.md, reward webhook protocol).

Each step's completions go out in batches of `max_items_per_request`, each signed with the
run's secret. Network errors, 5xx and 429 are retried with exponential backoff and full jitter
(honouring Retry-After) up to `max_attempts`, as every webhook of a run is
(workers/webhook_calls.py); any other answer that is not a complete, finite set of rewards
fails the run at once with a message naming the URL, the answer and the tries.

In async mode the reward model answers 202 and later POSTs the rewards to the API, which stores
them on the request's row; the worker waits until every request of the step is complete,
re-sends a request whose callback has not completed within `timeout_s`, and fails the run after
`max_attempts` sends. Groups therefore train only when all k rewards are in.
"""

import functools
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gvpo_client.signing import is_reward
from service.contract.events import EventLevel, EventType
from service.contract.outbound import OutboundClient
from service.contract.rewards import WebhookReward
from service.contract.webhooks import RewardItem, RewardRequest
from workers.chat import final_conversation
from workers.data import Example
from workers.errors import RunError
from workers.rewards.base import Scores
from workers.rollout.base import Rollout
from workers.webhook_calls import WebhookCaller

if TYPE_CHECKING:
    from service.config import Settings
    from workers.records import RunRecorder

ACCEPTED = object()  # an async reward model's 202: the rewards will come by callback


POLL_S = 0.2


@dataclass
class WebhookContext:
    run_id: str
    secret: Callable[[], str]  # read per request: a rotation takes effect at once
    callback_url: str
    allow_private: bool
    max_response_bytes: int
    on_retry: Callable[[str, dict], None]  # (message, data) -> records an event
    open_request: Callable[[str, int, list[str]], None]  # async: record before sending
    results: Callable[[list[str]], dict[str, dict[str, float] | None]]  # async: callbacks so far
    sleep: Callable[[float], None] = time.sleep
    on_call: Callable[[], None] = lambda: None  # counts a request sent in the run's usage
    # In ids instead of the purpose: a rescore's own ("rescore2s" for the run's second), so
    # that no two re-scorings of a run send the same sample ids.
    batch_tag: str = ""

    @classmethod
    def of_run(
        cls,
        settings: "Settings",
        recorder: "RunRecorder",
        batch_tag: str = "",
        retry_event: EventType = EventType.REWARD_RETRY,
    ) -> "WebhookContext":
        """The context of `recorder`'s run: its secret, its callback URL, retries recorded as
        its events (`retry_event`: ENVIRONMENT_RETRY for its environment's webhook), async
        requests on its rows."""
        run_id = recorder.run_id
        return cls(
            run_id=run_id,
            secret=recorder.webhook_secret,
            callback_url=f"{settings.resolved_api_url}/v1/runs/{run_id}/rewards",
            allow_private=settings.webhook_allow_private,
            max_response_bytes=settings.webhook_max_response_bytes,
            on_retry=lambda message, data: recorder.event(
                retry_event, message, EventLevel.WARNING, data
            ),
            open_request=recorder.open_reward_request,
            results=recorder.reward_results,
            batch_tag=batch_tag,
            on_call=functools.partial(recorder.spent, **{_CALLS[retry_event]: 1}),
        )


_CALLS = {EventType.REWARD_RETRY: "reward_calls", EventType.ENVIRONMENT_RETRY: "environment_calls"}


def sample_id(run_id: str, batch: str, group: int, index: int) -> str:
    # Deterministic, so a replayed step sends the same ids and a receiver can deduplicate.
    return f"smp_{run_id.removeprefix('run_')}_{batch}_{group}_{index}"


def batch_name(step: int, purpose: str) -> str:
    """What ids are made of: the step's number for training, `eval12` for step 12's eval."""
    return str(step) if purpose == "train" else f"{purpose}{step}"


class WebhookScorer:
    def __init__(self, spec: WebhookReward, ctx: WebhookContext) -> None:
        self.spec, self.ctx = spec, ctx
        self.caller = WebhookCaller(
            "reward webhook", spec.url, spec.timeout_s, spec.max_attempts, ctx
        )

    def score(
        self,
        step: int,
        examples: list[Example],
        rollouts: list[Rollout],
        purpose: str = "train",
        groups: list[int] | None = None,
    ) -> Scores:
        run = self.ctx.run_id.removeprefix("run_")
        batch = batch_name(step, self.ctx.batch_tag or purpose)
        head = {"step": step, "purpose": purpose}  # what every request of the batch says
        numbers = groups or range(len(examples))  # each group's index in the step
        items = [
            RewardItem(
                sample_id=sample_id(self.ctx.run_id, batch, g, i),
                group_id=f"grp_{run}_{batch}_{g}",
                prompt=e.prompt,
                completion=c.text,
                answer=e.answer,
                messages=final_conversation(e, c),
                item=e.item if e.messages is not None else None,
            )
            for g, e, r in zip(numbers, examples, rollouts, strict=True)
            for i, c in enumerate(r.completions)
        ]
        size, attempt = self.spec.max_items_per_request, secrets.token_hex(3)
        # A fresh request id per execution of the step: a late callback to an earlier attempt
        # (before a resume) can never fill in rewards for different completions.
        requests = {
            f"rq_{run}_{batch}_{n}_{attempt}": items[start : start + size]
            for n, start in enumerate(range(0, len(items), size))
        }
        with self.caller.client() as client:
            if self.spec.mode == "async":
                rewards = self._collect_async(client, head, requests)
            else:
                rewards = {}
                for request_id, chunk in requests.items():
                    answer = self._post(client, self._body(request_id, head, chunk), request_id)
                    rewards.update(self._parse(answer, chunk))
        k = len(rollouts[0].completions)
        flat = [rewards[item.sample_id] for item in items]
        return Scores(torch.tensor(flat, dtype=torch.float32).view(len(rollouts), k))  # (G, k)

    def _body(self, request_id: str, head: dict, chunk: list[RewardItem]) -> bytes:
        return (
            RewardRequest(
                request_id=request_id,
                run_id=self.ctx.run_id,
                **head,
                callback_url=self.ctx.callback_url,
                items=chunk,
            )
            .model_dump_json()
            .encode()
        )

    def _collect_async(
        self, client: OutboundClient, head: dict, requests: dict[str, list[RewardItem]]
    ) -> dict[str, float]:
        rewards: dict[str, float] = {}
        pending: dict[str, tuple[float, int]] = {}  # request id -> (deadline, sends)
        for request_id, chunk in requests.items():
            self.ctx.open_request(request_id, head["step"], [item.sample_id for item in chunk])
            if (answer := self._send_async(client, head, request_id, chunk)) is not None:
                rewards.update(answer)
            else:
                pending[request_id] = (time.monotonic() + self.spec.timeout_s, 1)
        while pending:
            for request_id, got in self.ctx.results(list(pending)).items():
                if got is not None:
                    rewards.update(got)
                    del pending[request_id]
            for request_id, (deadline, sends) in list(pending.items()):
                if time.monotonic() < deadline:
                    continue
                if sends >= self.spec.max_attempts:
                    raise RunError(
                        f"reward webhook {self.spec.url}: no complete callback for {request_id} "
                        f"within timeout_s={self.spec.timeout_s:g} after {sends} tries"
                    )
                self.ctx.on_retry(
                    f"reward webhook {self.spec.url}: no complete callback for {request_id} "
                    f"within {self.spec.timeout_s:g} s; sending it again ({sends + 1} of "
                    f"{self.spec.max_attempts})",
                    {"url": self.spec.url, "request_id": request_id},
                )
                answer = self._send_async(client, head, request_id, requests[request_id])
                if answer is not None:
                    rewards.update(answer)
                    del pending[request_id]
                else:
                    pending[request_id] = (time.monotonic() + self.spec.timeout_s, sends + 1)
            if pending:
                self.ctx.sleep(POLL_S)
        return rewards

    def _send_async(
        self, client: OutboundClient, head: dict, request_id: str, chunk: list[RewardItem]
    ) -> dict[str, float] | None:
        """POST one async request; its rewards if the model answered at once, else None (202)."""
        answer = self._post(client, self._body(request_id, head, chunk), request_id)
        return None if answer is ACCEPTED else self._parse(answer, chunk)

    def _post(self, client: OutboundClient, body: bytes, request_id: str) -> object:
        """One request, retried as webhooks are: the parsed JSON of a 200, ACCEPTED for an
        async 202."""
        answer = self.caller.post(client, body, request_id)
        if answer.status == 202 and self.spec.mode == "async":
            return ACCEPTED
        if answer.status != 200:
            expected = (
                "202, or 200 with rewards" if self.spec.mode == "async" else "200 with rewards"
            )
            raise RunError(
                f"reward webhook {self.spec.url} answered HTTP {answer.status} "
                f"({answer.text[:200]!r}); a {self.spec.mode} reward model must answer "
                f"{expected}"
            )
        return self.caller.json_of(answer)

    def _parse(self, answer: object, chunk: list[RewardItem]) -> dict[str, float]:
        wanted = {item.sample_id for item in chunk}
        rows = answer.get("rewards") if isinstance(answer, dict) else None
        if not isinstance(rows, list):
            raise RunError(f"reward webhook {self.spec.url} answered without a 'rewards' list")
        got: dict[str, float] = {}
        for row in rows:
            sid = row.get("sample_id") if isinstance(row, dict) else None
            value = row.get("reward") if isinstance(row, dict) else None
            if sid not in wanted or sid in got:
                raise RunError(
                    f"reward webhook {self.spec.url} answered an unknown or repeated "
                    f"sample_id {sid!r}"
                )
            if not is_reward(value):
                raise RunError(
                    f"reward webhook {self.spec.url} answered a non-finite or "
                    f"non-numeric reward {value!r} for {sid}"
                )
            got[sid] = float(value)
        if missing := wanted - got.keys():
            raise RunError(
                f"reward webhook {self.spec.url} left {len(missing)} of {len(wanted)} "
                f"samples without a reward (e.g. {sorted(missing)[0]})"
            )
        return got
