"""The rollout engine contract: k sampled completions per prompt, with the exact token ids.

A prompt is text (tokenised by the engine's tokenizer, special tokens included, as the learner
tokenises it) or token ids taken as they are: a rendered chat prompt, or an episode's context,
whose sampled ids must never be re-tokenised.
"""

from dataclasses import dataclass
from typing import Protocol

import torch

from service.contract.spec import SamplingSpec


@dataclass(frozen=True)
class Segment:
    """A piece of a completion scored in a context of its own: `token_ids` given exactly
    `prompt_ids`, with `mask` (None: every id trains) as Completion.mask."""

    prompt_ids: list[int]
    token_ids: list[int]
    mask: list[int] | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    # Exactly the sampled tokens (ending with EOS when the model stopped), so the learner scores
    # what was generated rather than a re-tokenisation of the text.
    token_ids: list[int]
    # "stop" (EOS or a stop string) or "length"; an episode's: "done" (the environment ended
    # it), "max_turns" or "max_episode_tokens" (truncated)
    finish_reason: str
    # log pi(token | prefix) of each sampled token under the weights that sampled it, before
    # temperature/top-p: the learner recomputes the same numbers as a weight-sync check. None
    # where the engine shares the learner's module and so cannot drift from it.
    logprobs: list[float] | None = None
    # An episode's (workers/episodes.py): 1 on the tokens the policy sampled, 0 on the
    # template's and the environment's tokens between its turns, which carry no log-ratio.
    # None: every token was sampled (a single completion).
    mask: list[int] | None = None
    # An episode's turns after its prompt, in order (assistant and environment messages).
    turns: list["Turn"] | None = None
    reward: float | None = None  # the environment's, when it gave one with done
    # Where the completion is not one sequence after its rollout's prompt (an agent's turns
    # whose contexts do not extend one another, or an episode with a prompt of its own): its
    # pieces, each scored given its own prompt. token_ids and mask are then the pieces' joined,
    # so everything else sees one completion. None: token_ids after the rollout's prompt.
    segments: list[Segment] | None = None

    @property
    def sampled_tokens(self) -> int:
        return len(self.token_ids) if self.mask is None else sum(self.mask)


@dataclass(frozen=True)
class Turn:
    """One message of an episode and the token ids it took in the completion."""

    message: dict
    tokens: int  # its ids in Completion.token_ids (an assistant turn: what the policy sampled)
    trained: bool  # sampled by the policy (an assistant turn); else rendered, masked


@dataclass(frozen=True)
class Rollout:
    prompt_ids: list[int]
    completions: list[Completion]


Prompt = str | list[int]


def trained_parameters(model) -> dict[str, torch.Tensor]:
    """A copy of the parameters a policy trains (a LoRA adapter's, or every weight): what an
    async run's transformers engine loads, and what the learner computes the sampling policy's
    log-probs with."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def prompt_ids(tokenizer, prompt: Prompt) -> list[int]:
    return list(prompt) if isinstance(prompt, list) else tokenizer(prompt)["input_ids"]


class RolloutEngine(Protocol):
    name: str

    def generate(self, prompts: list[Prompt], n: int, sampling: SamplingSpec) -> list[Rollout]:
        """n completions for each prompt, in prompt order."""
        ...

    def load_weights(self, model) -> None:
        """Make the next generate() sample from `model`'s current weights."""
        ...

    def snapshot(self, model) -> object:
        """A copy of `model`'s current weights that load_snapshot() takes later, after the
        learner has moved on (async runs, workers/ahead.py)."""
        ...

    def load_snapshot(self, weights: object) -> None:
        """Make the next generate() sample with a snapshot's weights."""
        ...

    def offload(self) -> None:
        """Free what generation holds (KV cache, weights) until the next load_weights()."""
        ...

    def close(self) -> None:
        """Release the engine's memory for good."""
        ...
