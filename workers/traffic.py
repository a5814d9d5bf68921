"""Groups of served completions (DESIGN.md §v2.2, "Agents trained from their own traffic"):
an agent's episodes, each one or more completions the run's served model made, with the exact
prompt and sampled token ids of each (service/contract/groups.py, the stored form), trained
exactly as they were sampled.

An episode's turn j was sampled given its own `prompt_ids`. Where turn j+1's prompt extends
turn j's prompt and sampled ids exactly (the usual case: the agent appended the reply and the
next messages), the turns are one sequence, as an environment episode is (workers/episodes.py):
the sampled ids train, the ids between them (the template's end of turn, tool results, the next
generation prompt) are context, masked. Where it does not (the agent re-rendered the
conversation and the template or tokenizer gave other ids), the turn starts a new segment,
scored given its own prompt (workers/learner/logprobs.py), so every sampled id is scored in the
context it was sampled in and none other. An episode whose first prompt is not its group's
(episodes of one group need not share one) is a segment of its own too. s_i sums over every
sampled id of every turn; rewards are the episodes' own.

Each turn names the run step whose weights served it; a step reports how many updates older
than the policy it trains those weights were (offpolicy/staleness_mean, _max).
"""

from workers.rollout.base import Completion, Rollout, Segment

STALENESS_MEAN, STALENESS_MAX = "offpolicy/staleness_mean", "offpolicy/staleness_max"


def episode_segments(turns: list[dict]) -> list[Segment]:
    """An episode's turns as the fewest segments that score each sampled id given exactly its
    own prompt: a turn whose prompt extends the segment so far joins it, its new context ids
    masked; any other starts a segment."""
    segments: list[Segment] = []
    for turn in turns:
        prompt, sampled = list(turn["prompt_ids"]), list(turn["token_ids"])
        if segments:
            last = segments[-1]
            context = last.prompt_ids + last.token_ids
            if prompt[: len(context)] == context:
                between = prompt[len(context) :]
                segments[-1] = Segment(
                    last.prompt_ids,
                    last.token_ids + between + sampled,
                    last.mask + [0] * len(between) + [1] * len(sampled),
                )
                continue
        segments.append(Segment(prompt, sampled, [1] * len(sampled)))
    return segments


def traffic_rollout(episodes: list[dict], tokenizer) -> Rollout:
    """The group as the learner takes a rollout: the first episode's first prompt is the
    group's; an episode that is one sequence after it is an ordinary (masked) completion, any
    other carries its segments."""
    split = [episode_segments(e["turns"]) for e in episodes]
    prompt_ids = split[0][0].prompt_ids
    completions = []
    for segments in split:
        token_ids = [t for s in segments for t in s.token_ids]
        mask = [m for s in segments for m in s.mask]
        own = len(segments) > 1 or segments[0].prompt_ids != prompt_ids
        completions.append(
            Completion(
                text=tokenizer.decode(_shown(segments), skip_special_tokens=False),
                token_ids=token_ids,
                finish_reason="stop",
                mask=None if all(mask) else mask,
                segments=segments if own else None,
            )
        )
    return Rollout(prompt_ids=prompt_ids, completions=completions)


def _shown(segments: list[Segment]) -> list[int]:
    """What a sample shows of an episode: every id after its first prompt, and of a later
    segment's prompt what differs from the context before it (the re-rendered part)."""
    ids = list(segments[0].token_ids)
    context = segments[0].prompt_ids + segments[0].token_ids
    for segment in segments[1:]:
        same = 0
        for a, b in zip(context, segment.prompt_ids, strict=False):
            if a != b:
                break
            same += 1
        ids += segment.prompt_ids[same:] + segment.token_ids
        context = segment.prompt_ids + segment.token_ids
    return ids


def prompt_text(episodes: list[dict], tokenizer) -> str:
    """The group's prompt as samples show it: the first episode's first prompt, decoded."""
    return tokenizer.decode(episodes[0]["turns"][0]["prompt_ids"], skip_special_tokens=False)


def staleness(step: int, groups: list[list[dict]]) -> dict[str, float]:
    """offpolicy/staleness_mean and _max over the turns of a step's traffic groups: how many
    updates older than the policy that `step` trains the serving weights were (step - 1 -
    weights_step; 0: served by these very weights). Turns served by unknown weights count
    nothing; no such turn: {}."""
    ages = [
        step - 1 - turn["weights_step"]
        for episodes in groups
        for episode in episodes
        for turn in episode["turns"]
        if turn["weights_step"] is not None
    ]
    if not ages:
        return {}
    return {STALENESS_MEAN: sum(ages) / len(ages), STALENESS_MAX: float(max(ages))}
