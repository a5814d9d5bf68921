"""The rollout engine contract: k sampled completions per prompt, with the exact token ids."""

from dataclasses import dataclass
from typing import Protocol

from service.runs.spec import SamplingSpec


@dataclass(frozen=True)
class Completion:
    text: str
    # Exactly the sampled tokens (ending with EOS when the model stopped), so the learner scores
    # what was generated rather than a re-tokenisation of the text.
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


@dataclass(frozen=True)
class Rollout:
    prompt_ids: list[int]
    completions: list[Completion]


class RolloutEngine(Protocol):
    def generate(self, prompts: list[str], n: int, sampling: SamplingSpec) -> list[Rollout]:
        """n completions for each prompt, in prompt order."""
        ...
