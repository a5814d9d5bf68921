"""Built-in verifiers: pure functions (completion, answer) -> reward, looked up by name.

Importable without torch, so the API can check a spec's reward name at submit time.
"""

from collections.abc import Callable

from workers.registry import Registry

RewardFn = Callable[[str, str | None], float]
BUILTIN_REWARDS: Registry[RewardFn] = Registry("built-in reward")
register_reward = BUILTIN_REWARDS.register
get_reward = BUILTIN_REWARDS.lookup


@register_reward("exact_match")
def exact_match(completion: str, answer: str | None) -> float:
    """1.0 when the completion equals the answer, ignoring surrounding whitespace."""
    return float(answer is not None and completion.strip() == answer.strip())


@register_reward("char_accuracy")
def char_accuracy(completion: str, answer: str | None) -> float:
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
