"""Completions served with `metadata.gvpo_episode`, recorded for training from traffic.

vLLM is asked for the exact ids (`return_token_ids`): the prompt's, as its chat template and
tokenizer made them, and each choice's sampled ones. Each choice is stored under an id of its
own (`cmpl_…`), given back as the choice's `completion_id` and, for the first choice, as the
response's `id`, so an agent with n = 1 just keeps the response id; `weights_step` says which of
the run's steps the weights that served it are from. What the client did not ask for (the token
ids, unless it asked) is taken out of the answer again.
"""

from dataclasses import dataclass, field
from typing import Any

from service.db import session_scope
from service.errors import BadRequest
from service.models import Completion
from service.models.base import new_id
from service.serving.models import ServedModel

EPISODE_KEY = "gvpo_episode"
MAX_EPISODE_CHARS = 200
TOKEN_FIELDS = ("prompt_token_ids", "token_ids")


def episode_of(body: dict[str, Any]) -> str | None:
    """The request's metadata.gvpo_episode (None: not recorded); `metadata` itself is OpenAI's
    stored-completion labels, which vLLM does not take, so it is removed from the body."""
    metadata = body.pop("metadata", None)
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise BadRequest("'metadata' must be an object of string values")
    episode = metadata.get(EPISODE_KEY)
    if episode is None:
        return None
    if not isinstance(episode, str) or not 0 < len(episode) <= MAX_EPISODE_CHARS:
        raise BadRequest(
            f"metadata.{EPISODE_KEY} must be a string of 1 to {MAX_EPISODE_CHARS} characters: "
            "the agent's own name for the episode"
        )
    return episode


@dataclass
class _Choice:
    id: str = field(default_factory=lambda: new_id("cmpl"))
    prompt_ids: list[int] | None = None
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None


class Recorder:
    """Collects one served request's choices (whole, or chunk by chunk) and stores them."""

    def __init__(
        self,
        database_url: str,
        project_id: str,
        model: ServedModel,
        episode: str,
        show_ids: bool,
    ) -> None:
        self.url, self.project_id, self.model = database_url, project_id, model
        self.version, self.episode = model.version, episode
        self.show_ids = show_ids  # the client asked for return_token_ids itself
        self.choices: dict[int, _Choice] = {}

    def _choice(self, index: int) -> _Choice:
        return self.choices.setdefault(index, _Choice())

    def _first_id(self) -> str:
        return self._choice(min(self.choices, default=0)).id

    def whole(self, answer: dict[str, Any]) -> dict[str, Any]:
        """A non-streamed answer: its choices taken, the answer given their ids."""
        return self._take(answer, streamed=False)

    def chunk(self, event: dict[str, Any]) -> dict[str, Any]:
        """A streamed chunk: its tokens added to their choices, the chunk given their ids."""
        return self._take(event, streamed=True)

    def _take(self, part: dict[str, Any], streamed: bool) -> dict[str, Any]:
        """An answer (or a chunk of one) added to its choices, each given its id; a whole answer
        is a single chunk of every choice."""
        shared_prompt = part.get("prompt_token_ids")
        for choice in part.get("choices") or []:
            mine = self._choice(choice.get("index", 0))
            if mine.prompt_ids is None:
                mine.prompt_ids = choice.get("prompt_token_ids") or shared_prompt
            mine.token_ids += choice.get("token_ids") or []
            mine.text.append(_text(choice, streamed))
            mine.finish_reason = choice.get("finish_reason") or mine.finish_reason
            choice["completion_id"] = mine.id
            self._hide(choice)
        if self.choices:
            part["id"] = self._first_id()
        part["weights_step"] = self.version
        self._hide(part)
        return part

    def _hide(self, part: dict[str, Any]) -> None:
        if not self.show_ids:
            for name in TOKEN_FIELDS:
                part.pop(name, None)

    def store(self) -> None:
        rows = [
            Completion(
                id=c.id,
                project_id=self.project_id,
                run_id=self.model.run_id,
                model=self.model.name,
                episode=self.episode,
                weights_step=self.version,
                prompt_ids=list(c.prompt_ids or []),
                token_ids=c.token_ids,
                text="".join(c.text),
                finish_reason=c.finish_reason,
            )
            for c in self.choices.values()
            if c.prompt_ids
        ]
        if rows:
            with session_scope(self.url) as session:
                session.add_all(rows)


def _text(choice: dict[str, Any], streamed: bool = False) -> str:
    if "text" in choice:  # /v1/completions
        return choice.get("text") or ""
    message = choice.get("delta" if streamed else "message") or {}
    return message.get("content") or ""
