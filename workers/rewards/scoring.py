"""Turning a step's completions into rewards, as the run's reward spec says.

A scorer returns the (G, k) rewards and, for a composite, each component's own (G, k) scores so
that they can be reported as reward/<label>/mean, and the samples a grader could not grade.
"""

import torch

from service.contract.rewards import BuiltinReward, CompositeReward, RewardSpec, WebhookReward
from workers.data import Example
from workers.graders.base import GradingContext
from workers.rewards.base import GradingErrors, Scorer, Scores
from workers.rewards.builtin import get_reward
from workers.rewards.graders import GraderScorer
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
        scored = {
            label: part.score(step, examples, rollouts, purpose, groups)
            for label, part in zip(self.labels, self.parts, strict=True)
        }
        components = {label: s.rewards for label, s in scored.items()}
        total = sum(
            w * components[label] for w, label in zip(self.weights, self.labels, strict=True)
        )
        errors = GradingErrors()
        for part in scored.values():
            errors |= part.errors
        return Scores(total, components, errors)


def build_scorer(spec: RewardSpec, webhook: WebhookContext, grading: GradingContext) -> Scorer:
    """The scorer of `spec`: a built-in verifier, a webhook, a grader (any type of
    service.contract.graders), or a composite of those."""
    if isinstance(spec, CompositeReward):
        return CompositeScorer(spec, [build_scorer(c, webhook, grading) for c in spec.components])
    if isinstance(spec, WebhookReward):
        return WebhookScorer(spec, webhook)
    if isinstance(spec, BuiltinReward):
        return BuiltinScorer(spec)
    return GraderScorer(spec, grading)
