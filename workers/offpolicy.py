"""Off-policy groups: completions made elsewhere (a teacher, production logs, an older
checkpoint), trained with the same GVPO loss as fresh rollouts and no importance sampling.

GVPO's minimiser, pi* ∝ pi_ref·exp(R/beta), does not depend on which distribution produced a
group's completions, so a supplied group enters the learner exactly as a sampled one: its
completions are tokenised from their text (ending with EOS, as a completion the model finished),
its rewards are used as given or, when the group has none, scored by the run's reward. A chat
group's episodes (service/contract/groups.py) enter as the run's own episodes do: the prompt
rendered by the chat template exactly as the run renders it, then every message after it, with
a mask that trains the assistant messages' tokens only (workers/chat.py Renderer.episode). A
group of served completions (traffic) enters with its exact token ids (workers/traffic.py). Each
step takes `offpolicy_per_engine` groups in each rollout engine's share from a seeded shuffle
of the file (its cursor is checkpointed), and fresh rollouts for the rest of the share. Groups
posted to a running run (POST /v1/runs/{id}/groups) take those slots before the file does. A
group of fewer than k completions is topped up: the engine samples k for its prompt, as for a
fresh one, and the first k - n of them complete the group (one training process only, so that
no engine generates more than another).
"""

from collections import defaultdict
from dataclasses import dataclass, replace

import torch

from service.contract.groups import (
    DEFAULT_SOURCE,
    POLICY,
    group_item,
    group_size,
    is_chat_group,
    is_traffic_group,
)
from workers.chat import Renderer
from workers.data import Example, PromptSampler
from workers.rewards.base import Scorer, Scores
from workers.rollout.base import Completion, Rollout, Turn
from workers.traffic import prompt_text, traffic_rollout


@dataclass(frozen=True)
class Group:
    example: Example
    completions: list[str]  # a chat group's: each episode's last assistant content
    rewards: list[float] | None
    sources: list[str]  # one per completion
    episodes: list[list[dict]] | None = None  # a chat group's messages after the prompt
    traffic: list[dict] | None = None  # a traffic group's episodes: turns of exact token ids


# One group of a step: its example, and the Group when it comes from the file (None: the run
# samples it).
Slot = tuple[Example, Group | None]


def load_groups(rows: list[dict], renderer: Renderer) -> list[Group]:
    """Rows of an off-policy file (validated at upload: service/contract/groups.py). A chat
    group's prompt text, what samples and rewards show, is rendered by `renderer`;
    ChatTemplateError when the template cannot render it."""
    groups = []
    for row in rows:
        source = row.get("source", DEFAULT_SOURCE)
        sources = source if isinstance(source, list) else [source] * group_size(row)
        answer = None if row.get("answer") is None else str(row["answer"])
        if is_traffic_group(row):
            groups.append(_traffic_group(row, renderer.tokenizer, sources))
            continue
        if not is_chat_group(row):
            item = {k: v for k, v in group_item(row).items() if k != "completions"}
            example = Example(row["prompt"], answer, item=item)
            groups.append(Group(example, list(row["completions"]), row.get("rewards"), sources))
            continue
        example = Example("", answer, row["messages"], row.get("tools"), group_item(row))
        groups.append(
            Group(
                replace(example, prompt=renderer.prompt(example, as_chat=True)[0]),
                [episode[-1].get("content") or "" for episode in row["episodes"]],
                row.get("rewards"),
                sources,
                row["episodes"],
            )
        )
    return groups


def _traffic_group(row: dict, tokenizer, sources: list[str]) -> Group:
    """A traffic group: its prompt and texts decoded for the samples, its rewards as given."""
    episodes = row["traffic"]
    return Group(
        Example(prompt_text(episodes, tokenizer), None),
        [c.text for c in traffic_rollout(episodes, tokenizer).completions],
        [float(e["reward"]) for e in episodes],
        sources,
        traffic=episodes,
    )


def sampled_by_run(group: Group | None, k: int) -> int:
    """How many of a slot's k completions the run samples itself: all of a fresh prompt's,
    none of a whole group's, the rest of a group of fewer than k (topped up)."""
    return k if group is None else k - len(group.completions)


def slot_sources(group: Group | None, k: int) -> list[str]:
    """Where each of a slot's k completions came from."""
    given = group.sources if group is not None else []
    return given + [POLICY] * (k - len(given))


def as_rollout(
    group: Group,
    tokenizer,
    eos_id: int,
    top_up: Rollout | None = None,
    renderer: Renderer | None = None,
) -> Rollout:
    """The group as the learner takes a rollout: the prompt tokenised as the engines do, each
    completion's text tokenised and ended with EOS, no sampling log-probs; a chat group's
    episodes by `renderer` (default: the tokenizer's own chat template), masked to their
    assistant tokens. A group of fewer than k is completed from `top_up`, k completions the
    run sampled for its prompt (the first ones are used, with their sampled tokens and
    log-probs). A traffic group is its exact ids (workers/traffic.py)."""
    if group.traffic is not None:
        return traffic_rollout(group.traffic, tokenizer)
    if group.episodes is not None:
        prompt_ids, given = _episodes(group, renderer or Renderer(tokenizer, [eos_id]))
    else:
        prompt_ids = tokenizer(group.example.prompt)["input_ids"]
        given = [
            Completion(
                text=text,
                finish_reason="stop",
                token_ids=tokenizer(text, add_special_tokens=False)["input_ids"] + [eos_id],
            )
            for text in group.completions
        ]
    if top_up is None:
        return Rollout(prompt_ids=prompt_ids, completions=given)
    missing = len(top_up.completions) - len(given)
    return Rollout(prompt_ids=top_up.prompt_ids, completions=given + top_up.completions[:missing])


def _episodes(group: Group, renderer: Renderer) -> tuple[list[int], list[Completion]]:
    """(the prompt's ids, a completion per episode) of a chat group: every id after the prompt,
    trained on the assistant messages' only, with the episode's turns for its samples."""
    example, completions, prompt_ids = group.example, [], []
    for text, episode in zip(group.completions, group.episodes or [], strict=True):
        ids = renderer.episode(example.conversation, episode, example.tools)
        prompt_ids = ids.prompt_ids
        turns = [
            Turn(message, tokens, trained=message["role"] == "assistant")
            for message, tokens in zip(episode, ids.turn_tokens, strict=True)
        ]
        completions.append(
            Completion(
                text=text,
                token_ids=ids.token_ids,
                finish_reason="stop",
                mask=ids.mask,
                turns=turns,
            )
        )
    return prompt_ids, completions


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


def draw_slots(
    prompts: PromptSampler,
    groups: PromptSampler | None,
    posted: list[Group],
    off: int,
    per_step: int,
    engines: int,
) -> list[Slot]:
    """A step's groups, the same on every rank. Each rollout engine's share starts with its
    `off` off-policy slots: groups posted to the run first (`posted`, a multiple of `engines`,
    at most `off` each), then groups from the file; slots neither fills, and the rest of the
    share, are prompts it samples fresh. Every engine so generates as many (with no off-policy
    groups, the same prompts in the same order as ever)."""
    share, mine = per_step // engines, len(posted) // engines
    from_file = off - mine if groups is not None else 0
    drawn = groups.next(from_file * engines) if from_file else []
    each = share - mine - from_file
    fresh = prompts.next(each * engines) if each else []
    slots: list[Slot] = []
    for e in range(engines):
        slots += [(g.example, g) for g in posted[e * mine : (e + 1) * mine]]
        slots += [(g.example, g) for g in drawn[e * from_file : (e + 1) * from_file]]
        slots += [(x, None) for x in fresh[e * each : (e + 1) * each]]
    return slots


def score_slots(
    scorer: Scorer, step: int, slots: list[Slot], rollouts: list[Rollout], purpose: str = "train"
) -> Scores:
    """(G, k) rewards: an off-policy group's own where it has them, an episode's environment's
    where it gave one, else the run's reward (composite components are then over the groups it
    scored)."""
    k = len(rollouts[0].completions)
    rewards = torch.zeros(len(slots), k)  # (G, k)
    need = []
    for i, (_, group) in enumerate(slots):
        if group is not None and group.rewards is not None:
            rewards[i] = torch.tensor(group.rewards, dtype=torch.float32)
        elif (given := environment_rewards(rollouts[i])) is not None:
            rewards[i] = torch.tensor(given, dtype=torch.float32)
        else:
            need.append(i)
    if not need:
        return Scores(rewards)
    scored = scorer.score(
        step, [slots[i][0] for i in need], [rollouts[i] for i in need], purpose, groups=need
    )
    rewards[need] = scored.rewards
    errors = scored.errors.placed(need, len(slots))
    for i in need:  # episodes the environment scored keep its reward
        for j, c in enumerate(rollouts[i].completions):
            if c.reward is not None:
                rewards[i, j] = c.reward
                if errors.failed is not None:
                    errors.failed[i, j] = False
    return Scores(rewards, scored.components, errors)


def environment_rewards(rollout: Rollout) -> list[float] | None:
    """A group of episodes' rewards when the environment gave each of them one, else None."""
    given = [c.reward for c in rollout.completions]
    return given if all(r is not None for r in given) else None
