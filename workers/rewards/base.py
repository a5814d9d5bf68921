"""What every scorer returns, and the scorer contract."""

from dataclasses import dataclass, field
from typing import Protocol

import torch

from workers.data import Example
from workers.rollout.base import Rollout


@dataclass(frozen=True)
class GradingErrors:
    """Samples whose reward could not be graded (each then has reward 0): how many, and one
    of their errors (kind and text) to show (reward/errors and a warning event each step)."""

    count: int = 0
    kind: str | None = None
    detail: str | None = None

    def __add__(self, other: "GradingErrors") -> "GradingErrors":
        shown = self if self.count else other
        return GradingErrors(self.count + other.count, shown.kind, shown.detail)


@dataclass
class Scores:
    rewards: torch.Tensor  # (G, k)
    components: dict[str, torch.Tensor] = field(default_factory=dict)  # label -> (G, k)
    errors: GradingErrors = field(default_factory=GradingErrors)


class Scorer(Protocol):
    def score(
        self,
        step: int,
        examples: list[Example],
        rollouts: list[Rollout],
        purpose: str = "train",
        groups: list[int] | None = None,
    ) -> Scores:
        """(G, k) rewards for the groups; `purpose` "eval" for an evaluation's; `groups`: each
        group's index in the step when these are some of its groups (default 0, 1, ...)."""
        ...
