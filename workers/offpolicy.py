"""Off-policy groups: completions made elsewhere (a teacher, production logs, an older
checkpoint), trained with the same GVPO loss as fresh rollouts and no importance sampling.

GVPO's minimiser, pi* ∝ pi_ref·exp(R/beta), does not depend on which distribution produced a
group's completions, so a supplied group enters the learner exactly as a sampled one: its
completions are tokenised from their text (ending with EOS, as a completion the model finished),
its rewards are used as given or, when the group has none, scored by the run's reward. Each
step takes `offpolicy_per_engine` groups in each rollout engine's share from a seeded shuffle
of the file (its cursor is checkpointed), and fresh rollouts for the rest of the share.
"""

from collections import defaultdict
from dataclasses import dataclass

import torch

from service.files.groups import DEFAULT_SOURCE
from workers.data import Example, PromptSampler
from workers.rewards.base import Scorer, Scores
from workers.rollout.base import Completion, Rollout

POLICY = "policy"  # the source of a completion the run sampled itself


@dataclass(frozen=True)
class Group:
    example: Example
    completions: list[str]
    rewards: list[float] | None
    sources: list[str]  # one per completion


# One group of a step: its example, and the Group when it comes from the file (None: the run
# samples it).
Slot = tuple[Example, Group | None]


def load_groups(rows: list[dict]) -> list[Group]:
    """Rows of an off-policy file (validated at upload: service/files/groups.py)."""
    groups = []
    for row in rows:
        source = row.get("source", DEFAULT_SOURCE)
        sources = source if isinstance(source, list) else [source] * len(row["completions"])
        answer = row.get("answer")
        groups.append(Group(Example(row["prompt"], None if answer is None else str(answer)),
                            list(row["completions"]), row.get("rewards"), sources))
    return groups


def as_rollout(group: Group, tokenizer, eos_id: int) -> Rollout:
    """The group as the learner takes a rollout: the prompt tokenised as the engines do, each
    completion's text tokenised and ended with EOS, no sampling log-probs."""
    return Rollout(
        prompt_ids=tokenizer(group.example.prompt)["input_ids"],
        completions=[Completion(text=text, finish_reason="stop",
                                token_ids=tokenizer(text, add_special_tokens=False)["input_ids"]
                                + [eos_id])
                     for text in group.completions],
    )


def per_source(rewards: torch.Tensor, sources: list[list[str]]) -> dict[str, float]:
    """source/<label>/reward_mean and source/<label>/samples over a step's (G, k) rewards."""
    by_source: dict[str, list[float]] = defaultdict(list)
    for row, labels in zip(rewards.tolist(), sources, strict=True):
        for reward, label in zip(row, labels, strict=True):
            by_source[label].append(reward)
    metrics = {}
    for label, values in sorted(by_source.items()):
        metrics[f"source/{label}/reward_mean"] = sum(values) / len(values)
        metrics[f"source/{label}/samples"] = float(len(values))
    return metrics


def draw_slots(prompts: PromptSampler, groups: PromptSampler | None, off: int, per_step: int,
               engines: int) -> list[Slot]:
    """A step's groups, the same on every rank: for each rollout engine's share, `off` groups
    from the file and then the prompts it samples fresh, so that every engine generates as many
    (with no file, the same prompts in the same order as ever)."""
    share = per_step // engines
    drawn = groups.next(off * engines) if off else []
    fresh = prompts.next((share - off) * engines) if share > off else []
    slots: list[Slot] = []
    for e in range(engines):
        slots += [(g.example, g) for g in drawn[e * off : (e + 1) * off]]
        slots += [(x, None) for x in fresh[e * (share - off) : (e + 1) * (share - off)]]
    return slots


def score_slots(scorer: Scorer, step: int, slots: list[Slot], rollouts: list[Rollout]) -> Scores:
    """(G, k) rewards: an off-policy group's own where it has them, else the run's reward
    (composite components are then over the groups it scored)."""
    k = len(rollouts[0].completions)
    rewards = torch.zeros(len(slots), k)  # (G, k)
    need = []
    for i, (_, group) in enumerate(slots):
        if group is not None and group.rewards is not None:
            rewards[i] = torch.tensor(group.rewards, dtype=torch.float32)
        else:
            need.append(i)
    if not need:
        return Scores(rewards)
    scored = scorer.score(step, [slots[i][0] for i in need], [rollouts[i] for i in need],
                          groups=need)
    rewards[need] = scored.rewards
    return Scores(rewards, scored.components)
