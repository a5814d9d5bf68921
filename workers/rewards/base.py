"""What every scorer returns, and the scorer contract."""

from dataclasses import dataclass, field
from typing import Protocol

import torch

from workers.data import Example
from workers.rollout.base import Rollout


@dataclass(frozen=True)
class GradingErrors:
    """The completions whose reward a grader could not grade (each then has reward 0), and one
    of their errors (kind and text) to show: reward/errors and a warning event each step."""

    failed: torch.Tensor | None = None  # (G, k) bool; None: none failed
    kind: str | None = None
    detail: str | None = None

    @property
    def count(self) -> int:
        return 0 if self.failed is None else int(self.failed.sum())

    def __or__(self, other: "GradingErrors") -> "GradingErrors":
        """A completion failed when it failed in either (a composite's components)."""
        if other.failed is None:
            return self
        if self.failed is None:
            return other
        return GradingErrors(self.failed | other.failed, self.kind, self.detail)

    def placed(self, rows: list[int], groups: int) -> "GradingErrors":
        """These errors, of some groups, as those of a step of `groups` groups, where they are
        the groups `rows`."""
        if self.failed is None:
            return self
        failed = torch.zeros(groups, self.failed.shape[1], dtype=torch.bool)  # (G, k)
        failed[rows] = self.failed
        return GradingErrors(failed, self.kind, self.detail)


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
