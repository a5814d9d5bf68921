"""Synthetic tasks with verifiable answers, for warm-starting tiny models (bench/warmstart.py).

Each task is a seeded generator of JSONL rows {"prompt", "answer"} in the service's dataset
format, split into a train set and a held-out eval set that share no prompt. Answers are scored
by the built-in `exact_match` reward (whitespace-normalised equality with the completion the
service decodes, EOS dropped), so a model must write the answer and then stop.

Prompts are plain characters for the one-token-per-character tokenizer of workers/tiny_model.py
and end in a marker ("=", ">") after which the answer follows with no space.
"""

import json
import random
import string
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

# Bump when a generator's output for the same parameters changes: warm-start cache keys use it.
GENERATOR_VERSION = 1
REWARD = "exact_match"


@dataclass(frozen=True)
class TaskParams:
    train_rows: int = 5000
    eval_rows: int = 200


@dataclass(frozen=True)
class ArithmeticParams(TaskParams):
    """a+b= or a-b= with a, b drawn from [low, high]; subtraction keeps the result >= 0."""

    low: int = 10
    high: int = 99
    ops: str = "+-"


@dataclass(frozen=True)
class ReverseParams(TaskParams):
    """Reverse a lowercase word of min_len..max_len letters: "stone>" -> "enots"."""

    min_len: int = 3
    max_len: int = 7
    letters: str = string.ascii_lowercase


def _arithmetic_row(rng: random.Random, p: ArithmeticParams) -> dict:
    a, b = rng.randint(p.low, p.high), rng.randint(p.low, p.high)
    op = rng.choice(p.ops)
    if op == "-" and a < b:
        a, b = b, a
    return {"prompt": f"{a}{op}{b}=", "answer": str(a + b if op == "+" else a - b)}


@dataclass(frozen=True)
class CopyParams(TaskParams):
    """The demo's task: copy a string of `length` letters, "bdj=" -> "bdj" (partial credit)."""

    train_rows: int = 500
    eval_rows: int = 200
    length: int = 3
    letters: str = "abcdefghij"


def _copy_row(rng: random.Random, p: CopyParams) -> dict:
    word = "".join(rng.choice(p.letters) for _ in range(p.length))
    return {"prompt": f"{word}=", "answer": word}


def _reverse_row(rng: random.Random, p: ReverseParams) -> dict:
    word = "".join(rng.choice(p.letters) for _ in range(rng.randint(p.min_len, p.max_len)))
    return {"prompt": f"{word}>", "answer": word[::-1]}


@dataclass(frozen=True)
class Task:
    name: str
    params: TaskParams
    row: Callable[[random.Random, TaskParams], dict]
    max_new_tokens: int  # room for the longest answer plus EOS, with slack to overrun
    reward: str = REWARD  # the built-in reward that scores it; a completion passes at 1.0

    def key(self) -> dict:
        """What determines the rows: part of a warm-start cache key."""
        return {"task": self.name, "version": GENERATOR_VERSION, "params": asdict(self.params)}

    def split(self, seed: int) -> tuple[list[dict], list[dict]]:
        """(train, eval): distinct prompts within each set and none in both."""
        # A string seed keeps each task's stream apart from the others' for the same seed.
        rng = random.Random(f"{self.name}:{seed}")
        seen: set[str] = set()

        def draw(count: int) -> list[dict]:
            rows = []
            for _ in range(count * 50):
                if len(rows) == count:
                    return rows
                row = self.row(rng, self.params)
                if row["prompt"] not in seen:
                    seen.add(row["prompt"])
                    rows.append(row)
            raise ValueError(f"{self.name}: too few distinct prompts for {count} rows")

        held_out = draw(self.params.eval_rows)
        return draw(self.params.train_rows), held_out


TASKS: dict[str, Task] = {
    "arithmetic": Task("arithmetic", ArithmeticParams(), _arithmetic_row, max_new_tokens=8),
    "reverse": Task("reverse", ReverseParams(), _reverse_row, max_new_tokens=10),
    # Not warm-started: the demo trains it from the untrained tiny model.
    "copy": Task("copy", CopyParams(), _copy_row, max_new_tokens=5, reward="char_accuracy"),
}


def get_task(name: str, **overrides) -> Task:
    """The named task, with some of its parameters replaced (e.g. train_rows for a quick test)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    task = TASKS[name]
    params = type(task.params)(**{**asdict(task.params), **overrides})
    return Task(task.name, params, task.row, task.max_new_tokens, task.reward)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
