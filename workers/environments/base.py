"""The environment contract on the worker: given every live episode after a new assistant turn,
answer each with the messages the policy sees next, whether the episode is done, and
(optionally, when done) its reward.

Implementations: the webhook client (webhook.py, DESIGN.md's environment.step protocol) and
the built-in environments (builtin.py: toy tasks, python_tool.py: a sandboxed Python tool).
"""

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class EpisodeView:
    """What an environment is told about one live episode."""

    episode_id: str  # deterministic: the same on a replayed step
    group_id: str
    item: dict[str, Any]  # the dataset row's fields other than messages and tools
    # The whole conversation (prompt messages first), ending with the assistant's new turn;
    # an assistant message carries `tool_calls` (OpenAI's shape) when the policy made some.
    messages: list[dict[str, Any]]


@dataclass(frozen=True)
class Reply:
    """An environment's answer for one episode."""

    messages: list[dict[str, Any]] = field(default_factory=list)  # role tool | user
    done: bool = False
    reward: float | None = None  # only with done; None: the run's reward scores the episode


class Environment(Protocol):
    name: str

    def step(self, step: int, turn: int, episodes: list[EpisodeView], purpose: str) -> list[Reply]:
        """One reply per episode, in order. `turn` counts the assistant turns so far (1 after
        the first); `purpose` is "train", "eval", "rescore" or "dry_run". Raises RunError when
        the environment fails for good (the run fails with that message)."""
        ...

    def close(self) -> None:
        """Release what the environment holds (clients, sandboxes)."""
        ...
