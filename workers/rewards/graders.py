"""A run's reward from one of OpenAI's graders (workers/graders): every completion of the step
graded as one batch, as (sample, item) pairs.

The sample is the completion: its text, and the tool calls it made (a row with tools: the
`<tool_call>` blocks it wrote, its text then without them; an episode: the calls of every
assistant turn, its text the last turn's). The item is the row's fields but its messages and
tools (workers/data.py Example.item), so `{{ item.answer }}` works for plain and chat rows.

A sample the grader could not grade has reward 0; they are counted (Scores.errors), and the
run reports the count as reward/errors and one of them in an event.
"""

import math
from typing import Any

import torch

from service.contract.events import EventLevel, EventType
from workers.chat import assistant_message
from workers.data import Example
from workers.graders.base import Grade, GradeError, GradingContext, Sample
from workers.graders.registry import build_grader
from workers.rewards.base import GradingErrors, Scores
from workers.rollout.base import Completion, Rollout


def grading_context(settings, recorder) -> GradingContext:
    """The context of `recorder`'s run: its project, retries recorded as its events."""
    return GradingContext(
        settings=settings,
        project_id=recorder.project_id(),
        on_retry=lambda message, data: recorder.event(
            EventType.REWARD_RETRY, message, EventLevel.WARNING, data
        ),
    )


def sample_of(example: Example, completion: Completion) -> Sample:
    if completion.turns is not None:
        calls = [
            call
            for turn in completion.turns
            if turn.message.get("role") == "assistant"
            for call in turn.message.get("tool_calls") or []
        ]
        return Sample.of(completion.text, calls)
    if example.tools:
        message = assistant_message(completion.text, "call")
        return Sample.of(message.get("content") or "", message.get("tool_calls"))
    return Sample.of(completion.text)


def errors_of(grades: list[Grade], k: int) -> GradingErrors:
    """The failed grades of G groups of k completions, in order."""
    failed = [g for g in grades if g.error is not None]
    if not failed:
        return GradingErrors()
    mask = torch.tensor([g.error is not None for g in grades]).view(-1, k)  # (G, k)
    return GradingErrors(mask, str(failed[0].error), failed[0].detail)


def checked(grade: Grade) -> Grade:
    """A grade whose reward is a finite number; any other is that sample's error."""
    if isinstance(grade.reward, int | float) and math.isfinite(grade.reward):
        return grade
    return Grade.failed(GradeError.OTHER, f"the grader gave {grade.reward!r}, not a number")


class GraderScorer:
    def __init__(self, spec: Any, context: GradingContext) -> None:
        self.grader = build_grader(spec, context)

    def score(
        self,
        step: int,
        examples: list[Example],
        rollouts: list[Rollout],
        purpose: str = "train",
        groups: list[int] | None = None,
    ) -> Scores:
        pairs = [
            (sample_of(e, c), e.item)
            for e, r in zip(examples, rollouts, strict=True)
            for c in r.completions
        ]
        grades = [checked(g) for g in self.grader.grade(pairs)]
        k = len(rollouts[0].completions)
        rewards = torch.tensor([g.reward for g in grades], dtype=torch.float32)
        names = dict.fromkeys(name for g in grades for name in g.sub_rewards)
        parts = {  # a multi grader's sub-graders, reported as reward/<name>/mean
            name: torch.tensor([g.sub_rewards.get(name, 0.0) for g in grades]).view(-1, k)
            for name in names
        }
        return Scores(rewards.view(len(rollouts), k), parts, errors_of(grades, k))  # (G, k)


def record_errors(recorder, step: int, errors: GradingErrors, samples: int, purpose: str) -> None:
    """One warning event for a step (or an evaluation) whose grading had errors."""
    if not errors.count:
        return
    what = {"eval": "evaluation after step", "rescore": "re-scoring step"}.get(purpose, "step")
    recorder.event(
        EventType.REWARD_GRADER_ERRORS,
        f"{what} {step}: {errors.count} of {samples} samples could not be graded and have "
        f"reward 0; one of them: {errors.kind}: {errors.detail}",
        EventLevel.WARNING,
        {
            "step": step,
            "purpose": purpose,
            "count": errors.count,
            "samples": samples,
            "kind": errors.kind,
            "detail": errors.detail,
        },
    )
