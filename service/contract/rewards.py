"""A run spec's `reward` (RewardSpec): a built-in verifier, a webhook to a reward model, one of
OpenAI's graders (service/contract/graders.py), or a weighted sum of those; and the built-in
rewards' names and parameters.

The names and parameter models are the contract: a spec is checked against them when it is
submitted (the API), and the worker's verifiers (workers/rewards/builtin.py) implement exactly
these names, each taking its validated parameters.
"""

import math
import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from service.contract.graders import (
    CodeTestsGrader,
    MultiGrader,
    PythonGrader,
    ScoreModelGrader,
    StringCheckGrader,
    TextSimilarityGrader,
)
from service.contract.limits import MAX_ITEMS_PER_REQUEST, MAX_PATTERNS, MAX_TEXT, Strict, params_of


def finite(v: float) -> float:
    if not math.isfinite(v):
        raise ValueError("must be a finite number")
    return v


class RewardParams(Strict):
    """No parameters (the default)."""


class RegexParams(RewardParams):
    # The bounds on each branch: a list's length is not a pattern's.
    pattern: (
        Annotated[str, Field(max_length=MAX_TEXT)]
        | Annotated[
            list[Annotated[str, Field(max_length=MAX_TEXT)]], Field(max_length=MAX_PATTERNS)
        ]
    ) = Field(
        description="one pattern: 1.0 if it matches; a list: the share of patterns that match"
    )

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str | list[str]) -> str | list[str]:
        patterns = [v] if isinstance(v, str) else v
        if not patterns:
            raise ValueError("give at least one pattern")
        for p in patterns:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(
                    f"pattern {p!r} is not a valid regular expression: {exc}"
                ) from None
        return v


class LengthPenaltyParams(RewardParams):
    target: int = Field(ge=1, le=10_000_000, description="characters allowed without penalty")
    scale: float = Field(1.0, gt=0, description="penalty per target-length of excess")


# name -> its parameters
BUILTIN_REWARDS: dict[str, type[RewardParams]] = {
    "exact_match": RewardParams,
    "char_accuracy": RewardParams,
    "math_verify": RewardParams,
    "regex": RegexParams,
    "length_penalty": LengthPenaltyParams,
}


# The built-in rewards that compare a completion with its row's answer (dataset.answer_field).
ANSWER_REWARDS = ("exact_match", "char_accuracy", "math_verify")


def reward_params(name: str) -> type[RewardParams]:
    """The parameter model of the built-in reward `name`; ValueError naming the known ones."""
    try:
        return BUILTIN_REWARDS[name]
    except KeyError:
        raise ValueError(
            f"unknown built-in reward {name!r}; known: {', '.join(sorted(BUILTIN_REWARDS))}"
        ) from None


class BuiltinReward(Strict):
    type: Literal["builtin"]
    name: str = Field(max_length=MAX_TEXT)
    params: dict[str, Any] = Field(default_factory=dict, description="the reward's own settings")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        reward_params(v)  # ValueError naming the known rewards
        return v

    @model_validator(mode="after")
    def _params(self) -> "BuiltinReward":
        params_of(self.name, reward_params(self.name), self.params)
        return self


class WebhookReward(Strict):
    """An external reward model, called with signed POSTs (the reward webhook protocol)."""

    type: Literal["webhook"]
    url: str = Field(min_length=1, max_length=2048)
    mode: Literal["sync", "async"] = "sync"
    timeout_s: float = Field(60.0, gt=0, le=3600, description="per request; async: the deadline")
    max_attempts: int = Field(5, ge=1, le=20)
    max_items_per_request: int = Field(256, ge=1, le=MAX_ITEMS_PER_REQUEST)
    probe: bool = Field(
        False,
        description="at submission, check that the URL answers at all (any HTTP status) "
        "within 5 s; a URL that cannot be reached is a 422",
    )

    @property
    def name(self) -> str:
        return "webhook"


class _Weighted(Strict):
    weight: float = Field(1.0, description="its share of the composite reward")
    label: str | None = Field(
        None,
        max_length=200,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="metric name part: reward/<label>/mean",
    )

    _weight_finite = field_validator("weight")(finite)


class WeightedBuiltin(BuiltinReward, _Weighted):
    pass


class WeightedWebhook(WebhookReward, _Weighted):
    pass


class WeightedStringCheck(StringCheckGrader, _Weighted):
    pass


class WeightedTextSimilarity(TextSimilarityGrader, _Weighted):
    pass


class WeightedScoreModel(ScoreModelGrader, _Weighted):
    pass


class WeightedPython(PythonGrader, _Weighted):
    pass


class WeightedCodeTests(CodeTestsGrader, _Weighted):
    pass


class WeightedMulti(MultiGrader, _Weighted):
    pass


Component = Annotated[
    WeightedBuiltin
    | WeightedWebhook
    | WeightedStringCheck
    | WeightedTextSimilarity
    | WeightedScoreModel
    | WeightedPython
    | WeightedCodeTests
    | WeightedMulti,
    Field(discriminator="type"),
]


class CompositeReward(Strict):
    """A weighted sum of rewards; each component is also reported as reward/<label>/mean."""

    type: Literal["composite"]
    components: list[Component] = Field(min_length=1, max_length=32)

    def labels(self) -> list[str]:
        """Each component's metric label: its own, else its reward's (a grader's name, a
        built-in's name, "webhook"), numbered if repeated."""
        names = [c.label or _reward_label(c) for c in self.components]
        return [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]


def _reward_label(reward: Any) -> str:
    if isinstance(reward, BuiltinReward | WebhookReward):
        return reward.name
    return reward.name or reward.type


RewardSpec = Annotated[
    BuiltinReward
    | WebhookReward
    | StringCheckGrader
    | TextSimilarityGrader
    | ScoreModelGrader
    | PythonGrader
    | CodeTestsGrader
    | MultiGrader
    | CompositeReward,
    Field(discriminator="type"),
]


def reads_answer(reward: Any) -> bool:
    """Whether `reward` (a RewardSpec) reads the rows' answer field: a built-in that compares
    with it, or a webhook (its requests carry the answer). A grader names the row's fields it
    reads in its templates ({{ item.<field> }}) instead."""
    parts = reward.components if isinstance(reward, CompositeReward) else [reward]
    return any(
        isinstance(p, WebhookReward) or (isinstance(p, BuiltinReward) and p.name in ANSWER_REWARDS)
        for p in parts
    )
