"""What every scorer returns, and the scorer contract."""

from dataclasses import dataclass, field
from typing import Protocol

import torch

from workers.data import Example
from workers.rollout.base import Rollout


@dataclass
class Scores:
    rewards: torch.Tensor  # (G, k)
    components: dict[str, torch.Tensor] = field(default_factory=dict)  # label -> (G, k)


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
