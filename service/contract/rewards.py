"""The built-in rewards a run spec may name, and each one's parameters.

The names and parameter models are the contract: a spec is checked against them when it is
submitted (the API), and the worker's verifiers (workers/rewards/builtin.py) implement exactly
these names, each taking its validated parameters.
"""

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator


class RewardParams(BaseModel):
    """No parameters (the default)."""

    model_config = ConfigDict(extra="forbid")


class RegexParams(RewardParams):
    pattern: str | list[str] = Field(
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
                raise ValueError(f"pattern {p!r} is not a valid regular expression: {exc}") from None
        return v


class LengthPenaltyParams(RewardParams):
    target: int = Field(ge=1, description="characters allowed without penalty")
    scale: float = Field(1.0, gt=0, description="penalty per target-length of excess")


# name -> its parameters
BUILTIN_REWARDS: dict[str, type[RewardParams]] = {
    "exact_match": RewardParams,
    "char_accuracy": RewardParams,
    "math_verify": RewardParams,
    "regex": RegexParams,
    "length_penalty": LengthPenaltyParams,
}


def reward_params(name: str) -> type[RewardParams]:
    """The parameter model of the built-in reward `name`; ValueError naming the known ones."""
    try:
        return BUILTIN_REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown built-in reward {name!r}; known: "
                         f"{', '.join(sorted(BUILTIN_REWARDS))}") from None
