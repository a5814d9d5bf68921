"""Off-policy group files (purpose "offpolicy"): one group per line,

    {"prompt": str, "completions": [str, ...], "rewards": [float, ...]?, "source": str | [str]?,
     "answer": str?}

`rewards` (one per completion) are used as given; a group without them is scored by the run's
reward (with `answer`). A group of fewer completions than the run's algorithm.group_size is
topped up with completions the run samples from its policy (and then has no rewards of its
own). `source` labels where the completions came from (a teacher, production
logs, an older checkpoint), for the whole group or per completion: a group may mix sources.
"""

import re

from gvpo_client.signing import is_reward

SOURCE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
DEFAULT_SOURCE = "offpolicy"  # a group's source when it names none
POLICY = "policy"  # the source of a completion the run sampled itself
KEYS = {"prompt", "completions", "rewards", "source", "answer"}


def group_problem(row: dict) -> str | None:
    """What is wrong with one group row, or None."""
    if unknown := sorted(set(row) - KEYS):
        return f"unknown keys {unknown} (a group has {sorted(KEYS)})"
    if not isinstance(row.get("prompt"), str) or not row["prompt"]:
        return "'prompt' must be a non-empty string"
    completions = row.get("completions")
    if (
        not isinstance(completions, list)
        or not completions
        or not all(isinstance(c, str) for c in completions)
    ):
        return "'completions' must be a list of at least 1 string"
    rewards = row.get("rewards")
    if rewards is not None and (
        not isinstance(rewards, list)
        or len(rewards) != len(completions)
        or not all(is_reward(r) for r in rewards)
    ):
        return f"'rewards' must be {len(completions)} finite numbers, one per completion"
    source = row.get("source", DEFAULT_SOURCE)
    sources = source if isinstance(source, list) else [source]
    if isinstance(source, list) and len(source) != len(completions):
        return f"'source' must be one label or {len(completions)}, one per completion"
    if not all(isinstance(s, str) and SOURCE.match(s) for s in sources):
        return "'source' labels are 1-64 letters, digits, '_', '.' or '-'"
    if "answer" in row and not isinstance(row["answer"], (str, int, float)):
        return "'answer' must be a string or a number"
    return None


def fit_problem(row: dict, k: int, processes: int) -> str | None:
    """What keeps a valid group from training in a run whose groups are of k, or None. A group
    of fewer completions is topped up with the policy's own samples and scored whole by the
    run's reward, so it carries no rewards of its own; and since a step's engines must all
    generate alike, topping up is for runs of one training process."""
    n = len(row["completions"])
    if n > k:
        return (
            f"has {n} completions; algorithm.group_size is {k}, the most a group may have "
            "(fewer are topped up with the policy's own samples)"
        )
    if n < k and row.get("rewards") is not None:
        return (
            f"has {n} completions with rewards; a group of fewer than algorithm.group_size "
            f"({k}) is topped up with the policy's own samples and scored whole by the "
            f"run's reward: leave its rewards out, or give it {k} completions"
        )
    if n < k and processes > 1:
        return (
            f"has {n} completions, fewer than algorithm.group_size ({k}): topping a group "
            f"up is for runs of one training process, and this one has {processes}"
        )
    return None
