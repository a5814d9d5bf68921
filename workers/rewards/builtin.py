"""Built-in verifiers: pure functions (completion, answer, params) -> reward, looked up by name.

The names and each one's parameter model are the contract's (service/contract/rewards.py), where
a spec's reward is checked at submission; this module implements every one of them.
"""

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

from service.contract.rewards import (
    BUILTIN_REWARDS as NAMES,
)
from service.contract.rewards import (
    LengthPenaltyParams,
    RegexParams,
    RewardParams,
)
from workers.registry import Registry


@dataclass(frozen=True)
class Builtin:
    fn: Callable[[str, str | None, RewardParams], float]
    params: type[RewardParams]


BUILTIN_REWARDS: Registry[Builtin] = Registry("built-in reward")
get_reward = BUILTIN_REWARDS.lookup


def register_reward(name: str):
    """Implement the contract's built-in reward `name`, with the contract's parameters."""
    if name not in NAMES:
        raise ValueError(
            f"{name!r} is not a built-in reward of the contract; add it to "
            "service/contract/rewards.py first"
        )

    def wrap(fn: Callable[[str, str | None, RewardParams], float]):
        BUILTIN_REWARDS.register(name)(Builtin(fn, NAMES[name]))
        return fn

    return wrap


def _normalise(text: str) -> str:
    return " ".join(text.split())


@register_reward("exact_match")
def exact_match(completion: str, answer: str | None, _: RewardParams) -> float:
    """1.0 when the completion equals the answer, ignoring surrounding and repeated whitespace."""
    return float(answer is not None and _normalise(completion) == _normalise(answer))


@register_reward("char_accuracy")
def char_accuracy(completion: str, answer: str | None, _: RewardParams) -> float:
    """Partial credit for string tasks: 0.8 * share of answer positions right + 0.2 * same length.

    Dense enough for a tiny model to climb; a product of terms instead collapses learning because
    whole groups then score the same (zero variance, no signal).
    """
    if answer is None:
        return 0.0
    got, want = completion.strip(), answer.strip()
    if not want:
        return float(not got)
    right = sum(a == b for a, b in zip(got, want, strict=False))
    return 0.8 * right / len(want) + 0.2 * float(len(got) == len(want))


@register_reward("math_verify")
def math_verify(completion: str, answer: str | None, _: RewardParams) -> float:
    """1.0 when the completion's final answer (\\boxed{...}, or the last expression) is
    mathematically equal to the reference answer, via the math-verify library."""
    from math_verify import parse, verify

    if answer is None:
        return 0.0
    # math-verify's timeouts use SIGALRM, which only the main thread may set.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(answer, parsing_timeout=timeout)
    pred = parse(completion, parsing_timeout=timeout)
    return float(bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=timeout))


@register_reward("regex")
def regex(completion: str, answer: str | None, params: RegexParams) -> float:
    patterns = [params.pattern] if isinstance(params.pattern, str) else params.pattern
    return sum(re.search(p, completion) is not None for p in patterns) / len(patterns)


@register_reward("length_penalty")
def length_penalty(completion: str, answer: str | None, params: LengthPenaltyParams) -> float:
    """0 up to `target` characters, then -scale per target-length of excess (for composites)."""
    excess = max(0, len(completion) - params.target)
    return -params.scale * excess / params.target
