"""Prompt sampling: a seeded shuffle per epoch, with a cursor that checkpoints can store."""

from dataclasses import dataclass

import numpy as np


@dataclass
class Example:
    prompt: str
    answer: str | None


class PromptSampler:
    def __init__(self, examples: list[Example], seed: int, epoch: int = 0, position: int = 0):
        if not examples:
            raise ValueError("the training file has no rows")
        self.examples, self.seed = examples, seed
        self.epoch, self.position = epoch, position
        self._order = self._permutation(epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

    def next(self, n: int) -> list[Example]:
        batch = []
        while len(batch) < n:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            batch.append(self.examples[self._order[self.position]])
            self.position += 1
        return batch

    def cursor(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def at(self, cursor: dict[str, int]) -> "PromptSampler":
        """The same shuffle, continuing from a saved cursor."""
        return PromptSampler(self.examples, self.seed, cursor["epoch"], cursor["position"])


def load_examples(rows: list[dict], prompt_field: str, answer_field: str) -> list[Example]:
    examples = []
    for number, row in enumerate(rows, start=1):
        if prompt_field not in row:
            raise ValueError(f"training row {number} has no field {prompt_field!r}")
        answer = row.get(answer_field)
        examples.append(Example(str(row[prompt_field]), None if answer is None else str(answer)))
    return examples
