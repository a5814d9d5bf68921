"""What a training step reports: its metrics (DESIGN.md's standard names, plus the GVPO
diagnostics and per-source rewards) and its samples, over every rank's groups.

Pure functions of what the step produced; the run loop hands the result to the recorder.
"""

import math
from dataclasses import dataclass

from service.contract.metrics import REWARD_ERRORS, REWARD_MEAN
from workers.data import Example
from workers.episodes import TRUNCATED
from workers.learner.learner import LearnStats
from workers.offpolicy import Slot, per_source, sampled_by_run, slot_sources
from workers.rewards.base import Scores
from workers.rollout.base import Completion, Rollout
from workers.traffic import staleness

TURN_KEYS = ("role", "content", "tool_calls", "tool_call_id")


@dataclass(frozen=True)
class StepRecord:
    metrics: dict[str, float]
    samples: list[dict]
    tokens_generated: int  # tokens the run's engines sampled this step
    tokens_trained: int  # completion tokens of the groups the learner trained (usage)


def step_record(
    step: int,
    slots: list[Slot],
    rollouts: list[Rollout],
    scores: Scores,
    stats: LearnStats,
    lr: float,
    times: dict[str, float],
    posted_groups: int | None,
) -> StepRecord:
    """Step `step`'s metrics and samples; `posted_groups`: how many groups posted to the run
    the step took (None for a run without off-policy slots, which reports no per-source
    metrics)."""
    rewards = scores.rewards  # (G, k)
    k = rewards.shape[1]
    sources = [slot_sources(group, k) for _, group in slots]
    lengths = [c.sampled_tokens for r in rollouts for c in r.completions]
    sampled = sum(
        c.sampled_tokens
        for (_, group), r in zip(slots, rollouts, strict=True)
        for c in r.completions[k - sampled_by_run(group, k) :]
    )
    metrics = {
        REWARD_MEAN: rewards.mean().item(),
        "reward/std": rewards.std().item(),
        REWARD_ERRORS: float(scores.errors.count),
        "loss": stats.loss,
        "kl/ref": stats.kl_ref,
        "logratio/mean": stats.logratio_mean,
        "logratio/std": stats.logratio_std,
        "gvpo/residual_r2": stats.residual_r2,
        "entropy": stats.entropy,
        "grad_norm": stats.grad_norm,
        "lr": lr,
        "response_length/mean": sum(lengths) / len(lengths),
        "groups/zero_variance_frac": stats.zero_variance_frac,
        "rollout/logprob_diff_max": stats.logprob_diff_max,
        **times,
        # an async step's phases overlap: its wall time is time/step_s
        "throughput/tokens_per_s": sampled
        / max(times.get("time/step_s", sum(times.values())), 1e-9),
        **{f"reward/{label}/mean": part.mean().item() for label, part in scores.components.items()},
    }
    metrics |= episode_metrics(rollouts)
    if posted_groups is not None:
        metrics |= per_source(rewards, sources)
        metrics["offpolicy/posted_groups"] = float(posted_groups)
        metrics |= staleness(step, [g.traffic for _, g in slots if g and g.traffic is not None])
    # Undefined values are left out rather than stored as NaN (R² when no group had spread).
    metrics = {name: v for name, v in metrics.items() if math.isfinite(v)}
    samples = [
        {
            "group_index": g,
            "sample_index": i,
            "prompt": e.prompt,
            "completion": c.text,
            "answer": e.answer,
            "reward": float(rewards[g, i]),
            "source": sources[g][i],
            "episode": episode_record(e, c),
            "row": e.row,
            "weight": _at(stats.weights, g, i),
            "logratio": _at(stats.logratios, g, i),
        }
        for g, ((e, _), r) in enumerate(zip(slots, rollouts, strict=True))
        for i, c in enumerate(r.completions)
    ]
    # The learner measures the groups it trains (and, when it trains none, every group, for
    # the diagnostics alone).
    trained = sum(
        c.sampled_tokens
        for g, r in enumerate(rollouts)
        for i, c in enumerate(r.completions)
        if stats.groups_trained and g < len(stats.logratios) and stats.logratios[g][i] is not None
    )
    return StepRecord(metrics, samples, sampled, trained)


def _at(values: list[list[float | None]], g: int, i: int) -> float | None:
    """values[g][i] when the learner measured it (finite), else None."""
    value = values[g][i] if g < len(values) else None
    return value if value is not None and math.isfinite(value) else None


def episode_metrics(rollouts: list[Rollout]) -> dict[str, float]:
    """episode/turns_mean and episode/truncated_frac over a step's episodes (none: {})."""
    episodes = [c for r in rollouts for c in r.completions if c.turns is not None]
    if not episodes:
        return {}
    turns = [sum(t.trained for t in c.turns) for c in episodes]
    truncated = [c.finish_reason in TRUNCATED for c in episodes]
    return {
        "episode/turns_mean": sum(turns) / len(turns),
        "episode/truncated_frac": sum(truncated) / len(truncated),
    }


def recorded_message(turn: dict) -> dict:
    """A recorded turn (episode_record's) as the message it was: the keys it had."""
    return {key: value for key, value in turn.items() if key in TURN_KEYS and value is not None}


def episode_record(e: Example, c: Completion) -> dict | None:
    """A sample's `episode` (service/metrics/schemas.py EpisodeRead), for a multi-turn one."""
    if c.turns is None:
        return None
    return {
        "prompt_messages": e.conversation,
        "turns": [
            {
                **{key: t.message.get(key) for key in TURN_KEYS},
                "tokens": t.tokens,
                "trained": t.trained,
            }
            for t in c.turns
        ],
        "end": c.finish_reason,
        "trained_tokens": c.sampled_tokens,
        "tokens": len(c.token_ids),
    }
