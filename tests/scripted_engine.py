"""A rollout engine of our own for the tests: it 'samples' what a script says instead of what a
model would, and records the contexts it was given. It is what the episode runner hands an
engine, without a model's randomness (tests of masking, of exact ids, of environments)."""

from collections.abc import Callable

from workers.rollout.base import Rollout
from workers.rollout.text import CompletionBuilder


class ScriptedEngine:
    name = "scripted"

    def __init__(self, tokenizer, script: Callable[[int, int], list[int]], eos: int) -> None:
        """`script(call, row)`: the ids sampled for row `row` of generate() call `call` (0, 1,
        ...; a row is one of the call's prompts, each sampled n times alike)."""
        self.script, self.contexts = script, []
        self.builder = CompletionBuilder(tokenizer, [eos])

    def generate(self, prompts, n, sampling):
        call = len(self.contexts)
        self.contexts.append([list(p) for p in prompts])
        return [
            Rollout(list(p), [self.builder.build(self.script(call, row), sampling)] * n)
            for row, p in enumerate(prompts)
        ]

    def offload(self) -> None:
        """Nothing held."""
