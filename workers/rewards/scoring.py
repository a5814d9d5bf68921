"""Turning a step's completions into rewards, as the run's reward spec says.

A scorer returns the (G, k) rewards and, for a composite, each component's own (G, k) scores so
that they can be reported as reward/<label>/mean.
"""

import torch

from service.contract.rewards import BuiltinReward, CompositeReward, RewardSpec, WebhookReward
from workers.data import Example
from workers.rewards.base import Scorer, Scores
from workers.rewards.builtin import get_reward
from workers.rewards.webhook import WebhookContext, WebhookScorer
from workers.rollout.base import Rollout


class BuiltinScorer:
    def __init__(self, spec: BuiltinReward) -> None:
        builtin = get_reward(spec.name)
        self.fn, self.params = builtin.fn, builtin.params.model_validate(spec.params)

    def score(
        self,
        step: int,
        examples: list[Example],
        rollouts: list[Rollout],
        purpose: str = "train",
        groups: list[int] | None = None,
    ) -> Scores:
        rewards = [
            [self.fn(c.text, e.answer, self.params) for c in r.completions]
            for e, r in zip(examples, rollouts, strict=True)
        ]
        return Scores(torch.tensor(rewards, dtype=torch.float32))  # (G, k)


class CompositeScorer:
    def __init__(self, spec: CompositeReward, parts: list[Scorer]) -> None:
        self.labels, self.parts = spec.labels(), parts
        self.weights = [c.weight for c in spec.components]

    def score(
        self,
        step: int,
        examples: list[Example],
        rollouts: list[Rollout],
        purpose: str = "train",
        groups: list[int] | None = None,
    ) -> Scores:
        components = {
            label: part.score(step, examples, rollouts, purpose, groups).rewards
            for label, part in zip(self.labels, self.parts, strict=True)
        }
        total = sum(
            w * components[label] for w, label in zip(self.weights, self.labels, strict=True)
        )
        return Scores(total, components)


def build_scorer(spec: RewardSpec, webhook: WebhookContext) -> Scorer:
    if isinstance(spec, CompositeReward):
        return CompositeScorer(spec, [build_scorer(c, webhook) for c in spec.components])
    if isinstance(spec, WebhookReward):
        return WebhookScorer(spec, webhook)
    return BuiltinScorer(spec)
