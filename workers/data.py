"""Prompt sampling: a seeded shuffle per epoch, with a cursor that checkpoints can store."""

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.contract.chat import is_chat, row_item, template_messages


@dataclass(frozen=True)
class Example:
    """One dataset row: a plain prompt, or chat messages (with tools) to render."""

    prompt: str  # the plain prompt, or the rendered chat prompt (what samples show)
    answer: str | None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    item: dict[str, Any] = field(default_factory=dict)  # the row's fields but messages and tools
    row: int | None = None  # its index in the run's training file (its samples keep it)

    @property
    def conversation(self) -> list[dict[str, Any]]:
        """The row as chat messages (a plain prompt is one user message)."""
        return (
            self.messages
            if self.messages is not None
            else [{"role": "user", "content": self.prompt}]
        )


def example_of(row: dict, prompt_field: str, answer_field: str, number: int) -> Example:
    answer = row.get(answer_field)
    answer = None if answer is None else str(answer)
    if is_chat(row):
        messages = template_messages(row["messages"])
        return Example("", answer, messages, row.get("tools"), row_item(row), number - 1)
    if prompt_field not in row:
        raise ValueError(f"row {number} has neither 'messages' nor the field {prompt_field!r}")
    return Example(str(row[prompt_field]), answer, item=row_item(row), row=number - 1)


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
    return [
        example_of(row, prompt_field, answer_field, number)
        for number, row in enumerate(rows, start=1)
    ]
