"""The rollout engine contract: k sampled completions per prompt, with the exact token ids."""

from dataclasses import dataclass
from typing import Protocol

from service.contract.spec import SamplingSpec


@dataclass(frozen=True)
class Completion:
    text: str
    # Exactly the sampled tokens (ending with EOS when the model stopped), so the learner scores
    # what was generated rather than a re-tokenisation of the text.
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    # log pi(token | prefix) of each sampled token under the weights that sampled it, before
    # temperature/top-p: the learner recomputes the same numbers as a weight-sync check. None
    # where the engine shares the learner's module and so cannot drift from it.
    logprobs: list[float] | None = None


@dataclass(frozen=True)
class Rollout:
    prompt_ids: list[int]
    completions: list[Completion]


class RolloutEngine(Protocol):
    name: str

    def generate(self, prompts: list[str], n: int, sampling: SamplingSpec) -> list[Rollout]:
        """n completions for each prompt, in prompt order."""
        ...

    def load_weights(self, model) -> None:
        """Make the next generate() sample from `model`'s current weights."""
        ...

    def offload(self) -> None:
        """Free what generation holds (KV cache, weights) until the next load_weights()."""
        ...

    def close(self) -> None:
        """Release the engine's memory for good."""
        ...
