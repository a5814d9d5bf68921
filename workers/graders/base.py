"""What every grader takes and gives, and how a grader spec becomes one (the registry).

A grader grades a batch of (sample, item) pairs at once, so that the slow kinds can share the
cost: one sandbox for many `python` gradings, concurrent requests to a judge. Each pair gets a
`Grade`. A problem of the user's making (their code raised, their judge answered no number,
a template names a field the row lacks) is that sample's reward 0 with the error's kind and
text; it is counted (reward/errors) and never stops the run. A problem of ours (no sandbox on
this worker, a judge that cannot be reached after every try) raises RunError and fails the run.

The error kinds are OpenAI's (the `metadata.errors` of a grader run), so that
POST /v1/graders:run answers in its shape.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from service.config import Settings


class GradeError(StrEnum):
    FORMULA_PARSE = "formula_parse_error"
    INVALID_VARIABLE = "invalid_variable_error"
    MODEL_PARSE = "model_grader_parse_error"
    MODEL_REFUSAL = "model_grader_refusal_error"
    MODEL_SERVER = "model_grader_server_error"
    PYTHON_RUNTIME = "python_grader_runtime_error"
    PYTHON_SERVER = "python_grader_server_error"
    SAMPLE_PARSE = "sample_parse_error"
    TRUNCATED = "truncated_observation_error"
    UNRESPONSIVE = "unresponsive_reward_error"
    OTHER = "other_error"


@dataclass(frozen=True)
class Sample:
    """The `sample` namespace of templates and of a python grader's `grade(sample, item)`."""

    output_text: str
    output_json: Any = None  # output_text parsed as JSON, when it is JSON
    output_tools: list[dict] = field(default_factory=list)  # the completion's tool calls

    @classmethod
    def of(cls, text: str, tool_calls: list[dict] | None = None) -> "Sample":
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        return cls(text, parsed, list(tool_calls or []))

    def namespace(self) -> dict[str, Any]:
        return {
            "output_text": self.output_text,
            "output_json": self.output_json,
            "output_tools": self.output_tools,
        }


@dataclass
class Grade:
    reward: float
    error: GradeError | None = None
    detail: str | None = None  # the error, for a person (cut short)
    sub_rewards: dict[str, float] = field(default_factory=dict)  # a multi grader's parts
    token_usage: int = 0  # a judge's tokens
    model: str | None = None  # the judge that answered
    # judge model -> {prompt_tokens, completion_tokens, total_tokens} (OpenAI's
    # model_grader_token_usage_per_model); a multi grader's: its parts' (merged_usage)
    usage: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def failed(cls, error: GradeError, detail: str) -> "Grade":
        return cls(0.0, error, detail[-2_000:])


def merged_usage(grades: list[Grade]) -> dict[str, dict[str, int]]:
    """The grades' judges' token usage, summed per model."""
    total: dict[str, dict[str, int]] = {}
    for grade in grades:
        for model, counts in grade.usage.items():
            mine = total.setdefault(model, {})
            for name, n in counts.items():
                mine[name] = mine.get(name, 0) + n
    return total


@dataclass
class GradingContext:
    """What graders need of the run or request they grade for."""

    settings: "Settings"
    project_id: str  # whose models a score_model grader may name
    # (message, data) -> records a warning event (a judge's retry); the run's recorder, or nothing
    on_retry: Callable[[str, dict], None] = lambda message, data: None


class Grader(Protocol):
    def grade(self, pairs: list[tuple[Sample, dict[str, Any]]]) -> list[Grade]:
        """One Grade per (sample, item), in order."""
        ...


# grader type -> its builder(spec, context); each module registers its own kinds
BUILDERS: dict[str, Callable[[Any, GradingContext], Grader]] = {}


def register(kind: str) -> Callable:
    def decorate(builder: Callable[[Any, GradingContext], Grader]) -> Callable:
        BUILDERS[kind] = builder
        return builder

    return decorate
