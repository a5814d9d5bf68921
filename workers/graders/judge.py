"""`score_model`: an LLM judge. Each sample's messages, rendered, go to the judge as one chat
completion; the score it answers is the sample's reward.

- The judge: with `base_url`, any OpenAI-compatible endpoint (`{base_url}/chat/completions`,
  the key from the worker's environment variable `api_key_env`), called as webhooks are
  (service/contract/outbound.py: public addresses only unless GVPO_WEBHOOK_ALLOW_PRIVATE, no
  redirects, the answer capped at GVPO_WEBHOOK_MAX_RESPONSE_BYTES); without it, `model` is a
  `ckpt_…` or `run_…` of the grading project, served by our inference workers (served.py).
- The score: the answer's JSON `result` (the whole answer, or its first {...}), else the first
  number in it. No number, or one outside `range`: model_grader_parse_error, reward 0. A
  refusal (the message's `refusal`): model_grader_refusal_error, reward 0.
- Retries: network errors, timeouts, 5xx and 429 are tried again with backoff (Retry-After
  honoured) up to `max_attempts` tries, the first retry of each round reported through the
  context (a run's warning event). A judge still failing after every try, or one that can
  never answer (401, 403, 404: its key or model is wrong; a URL that may not be called; a
  model of ours whose files are gone) raises JudgeFailed: the run fails with an event. Any
  other answer (400: e.g. a prompt too long for the judge) is that sample's
  model_grader_server_error, reward 0.
- A batch's samples are judged concurrently, CONCURRENCY at a time; tokens used are counted
  per judge model.
"""

import json
import math
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from service.config import Settings
from service.contract.graders import JudgeMessage, ScoreModelGrader
from service.contract.outbound import Answer, OutboundClient, Refused, Transient, post_json
from workers.graders.base import Grade, GradeError, GradingContext, Sample, register
from workers.graders.served import JudgeFailed, ServedJudge
from workers.graders.templates import Template, TemplateFailure
from workers.webhook_calls import backoff

CONCURRENCY = 16  # requests in flight per batch
NEVER = (401, 403, 404)  # no sample can be graded: the judge's key or model is wrong
NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)
SHOWN = 300  # characters of a judge's answer quoted in an error


def parse_score(text: str) -> float | None:
    """The score in a judge's answer: `result` of its JSON object (the whole answer, or the
    first {...} in it), else the first number in the text; None when there is none."""
    for candidate in (text, *JSON_OBJECT.findall(text)[:1]):
        try:
            data = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(data, dict):
            data = data.get("result")
        if isinstance(data, int | float) and not isinstance(data, bool):
            return float(data)
        if isinstance(data, str) and (match := NUMBER.fullmatch(data.strip())):
            return float(match.group())
    match = NUMBER.search(text)
    return float(match.group()) if match else None


class UrlJudge:
    """A judge at any OpenAI-compatible endpoint, reached as webhooks are."""

    def __init__(self, spec: ScoreModelGrader, settings: Settings) -> None:
        self.url = f"{spec.base_url.rstrip('/')}/chat/completions"
        self.model, self.timeout_s = spec.model, spec.timeout_s
        self.headers = {}
        if spec.api_key_env:
            key = os.environ.get(spec.api_key_env)
            if not key:
                raise JudgeFailed(
                    f"{self.describe()}: the worker has no environment variable "
                    f"{spec.api_key_env} (api_key_env) holding its key"
                )
            self.headers["Authorization"] = f"Bearer {key}"
        self.max_bytes = settings.webhook_max_response_bytes
        self.client = OutboundClient(settings.webhook_allow_private, spec.timeout_s)

    def describe(self) -> str:
        return f"judge {self.model} at {self.url}"

    def __enter__(self) -> "UrlJudge":
        return self

    def __exit__(self, *exc) -> None:
        self.client.close()

    def post(self, body: bytes) -> Answer:
        try:
            return post_json(
                self.client, self.url, body, self.headers, self.max_bytes, self.timeout_s
            )
        except Refused as exc:
            raise JudgeFailed(f"{self.describe()} may not be called: {exc}") from None


Endpoint = UrlJudge | ServedJudge


class ScoreModel:
    def __init__(self, spec: ScoreModelGrader, context: GradingContext) -> None:
        self.spec, self.context = spec, context
        self.messages = [
            (_role(m, served=spec.base_url is None), [Template(t) for t in _texts(m)])
            for m in spec.input
        ]

    def endpoint(self) -> Endpoint:
        if self.spec.base_url is not None:
            return UrlJudge(self.spec, self.context.settings)
        settings = self.context.settings
        return ServedJudge(settings, self.context.project_id, self.spec.model, self.spec.timeout_s)

    def grade(self, pairs: list[tuple[Sample, dict[str, Any]]]) -> list[Grade]:
        if not pairs:
            return []
        with self.endpoint() as endpoint:
            batch = _Batch(self, endpoint)
            try:
                with ThreadPoolExecutor(min(CONCURRENCY, len(pairs)), "judge") as pool:
                    return list(pool.map(batch.grade_one, pairs))
            except JudgeFailed as exc:  # the request that failed first says why
                raise batch.failure or exc from None

    def request(self, sample: Sample, item: dict[str, Any]) -> bytes:
        """The chat completion asked of the judge (TemplateFailure for a template that cannot be
        rendered for this sample)."""
        messages = [
            {"role": role, "content": "\n".join(t.render(sample, item) for t in texts)}
            for role, texts in self.messages
        ]
        body: dict[str, Any] = {"model": self.spec.model, "messages": messages}
        if (params := self.spec.sampling_params) is not None:
            wanted = {
                "max_completion_tokens": params.max_completions_tokens,
                "temperature": params.temperature,
                "top_p": params.top_p,
                "seed": params.seed,
            }
            if self.spec.base_url is not None:  # our own models take no reasoning effort
                wanted["reasoning_effort"] = params.reasoning_effort
            body.update({k: v for k, v in wanted.items() if v is not None})
        return json.dumps(body).encode()


def _role(message: JudgeMessage, served: bool) -> str:
    # Our models' chat templates know system, user and assistant; developer is OpenAI's name
    # for the system's instructions.
    return "system" if served and message.role == "developer" else message.role


def _texts(message: JudgeMessage) -> list[str]:
    content = message.content
    return [content] if isinstance(content, str) else [part.text for part in content]


class _Batch:
    """One grade() call: its endpoint, its threads' shared state."""

    def __init__(self, grader: ScoreModel, endpoint: Endpoint) -> None:
        self.grader, self.endpoint = grader, endpoint
        self.spec = grader.spec
        self.stop = threading.Event()  # a request failed for good: the others stop trying
        self.failure: JudgeFailed | None = None  # that request's failure
        self.lock = threading.Lock()
        self.reported: set[int] = set()  # retry rounds already reported

    def grade_one(self, pair: tuple[Sample, dict[str, Any]]) -> Grade:
        sample, item = pair
        try:
            body = self.grader.request(sample, item)
        except TemplateFailure as exc:
            return exc.grade()
        try:
            return self.read(self.ask(body))
        except JudgeFailed as exc:
            with self.lock:
                if not self.stop.is_set():
                    self.failure = exc
                    self.stop.set()
            raise

    def ask(self, body: bytes) -> Answer:
        """The judge's answer, tried again on network errors, timeouts, 5xx and 429."""
        tries = self.spec.max_attempts
        for attempt in range(1, tries + 1):
            if self.stop.is_set():
                raise JudgeFailed(f"{self.endpoint.describe()}: another request failed for good")
            try:
                answer = self.endpoint.post(body)
            except Transient as exc:
                last, wait = exc.answer, exc.retry_after
            else:
                if not answer.retryable:
                    return answer
                last, wait = answer.describe(), answer.retry_after
            if attempt == tries:
                break
            delay = backoff(attempt, wait)
            self.report(attempt, tries, last, delay)
            self.stop.wait(delay)
        raise JudgeFailed(
            f"{self.endpoint.describe()} failed after {tries} tries; last answer: {last}"
        )

    def report(self, attempt: int, tries: int, last: str, delay: float) -> None:
        """A retry, reported once per round of the batch (not once per sample)."""
        with self.lock:
            if attempt in self.reported:
                return
            self.reported.add(attempt)
        self.grader.context.on_retry(
            f"{self.endpoint.describe()} answered {last}; retry {attempt} of {tries - 1} "
            f"in {delay:.1f} s",
            {"model": self.spec.model, "answer": last, "attempt": attempt, "delay_s": delay},
        )

    def read(self, answer: Answer) -> Grade:
        where = self.endpoint.describe()
        if answer.status in NEVER:
            raise JudgeFailed(
                f"{where} answered {answer.describe()}: check the model's name and the key "
                "(api_key_env)"
            )
        if answer.status != 200 or answer.over_limit:
            why = "more bytes than allowed" if answer.over_limit else answer.describe()
            return Grade.failed(GradeError.MODEL_SERVER, f"{where} answered {why}")
        try:
            data = json.loads(answer.text)
            message = data["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            return Grade.failed(
                GradeError.MODEL_SERVER,
                f"{where} answered 200 without a chat completion: {answer.text[:SHOWN]!r}",
            )
        grade = self.score(message)
        grade.model = str(data.get("model") or self.spec.model)
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        counts = {
            name: int(usage[name])
            for name in ("prompt_tokens", "completion_tokens", "total_tokens")
            if isinstance(usage.get(name), int)
        }
        grade.token_usage = counts.get("total_tokens", 0)
        grade.usage = {grade.model: counts}
        return grade

    def score(self, message: Any) -> Grade:
        if not isinstance(message, dict):
            return Grade.failed(GradeError.MODEL_SERVER, "the judge answered no message")
        if message.get("refusal"):
            return Grade.failed(
                GradeError.MODEL_REFUSAL, f"the judge refused: {message['refusal']}"
            )
        text = message.get("content")
        if not isinstance(text, str):
            return Grade.failed(GradeError.MODEL_PARSE, "the judge answered no text")
        score = parse_score(text)
        low, high = self.spec.range
        if score is None or not math.isfinite(score):
            return Grade.failed(
                GradeError.MODEL_PARSE, f"the judge answered no score: {text[:SHOWN]!r}"
            )
        if not low <= score <= high:
            return Grade.failed(
                GradeError.MODEL_PARSE,
                f"the judge's score {score:g} is outside range [{low:g}, {high:g}]",
            )
        return Grade(score)


@register("score_model")
def build(spec: ScoreModelGrader, context: GradingContext) -> ScoreModel:
    return ScoreModel(spec, context)
