"""Groups of an agent's own served traffic (DESIGN.md §v2.2), posted to a run:

    {"episodes": [{"completion_ids": ["cmpl_…", ...], "reward": 0.7}, ...], "source"?: label}

Each episode is the completions the agent was served in it, in order (recorded because it sent
metadata.gvpo_episode), with its reward; a group has the run's algorithm.group_size episodes.
The completions must have been served by the run (its model, or one of its checkpoints): their
ids are the run's tokenizer's, and the run trains on exactly them. The group is stored with
those ids (workers/offpolicy.py reads that form), so training never reads the completions table.
"""

from sqlalchemy import select
from sqlalchemy.orm import Session

from gvpo_client.signing import is_reward
from service.contract.groups import SOURCE
from service.models import Completion, Project, Run

TRAFFIC_SOURCE = "traffic"  # a traffic group's source when it names none
MAX_TURNS = 256  # completions in one episode
QUERY_CHUNK = 500


def is_traffic(row: dict) -> bool:
    """A posted group of recorded completions (rather than text or chat messages)."""
    episodes = row.get("episodes")
    return (
        "messages" not in row
        and isinstance(episodes, list)
        and any(isinstance(e, dict) and "completion_ids" in e for e in episodes)
    )


def traffic_problem(row: dict, k: int) -> str | None:
    """What is wrong with a traffic group's form, or None."""
    if unknown := sorted(set(row) - {"episodes", "source"}):
        return f"unknown keys {unknown} (a group of served completions has 'episodes', 'source')"
    episodes = row["episodes"]
    if len(episodes) != k:
        return (
            f"has {len(episodes)} episodes; algorithm.group_size is {k}, and a group of "
            "served completions has exactly that many (the run samples none to top it up)"
        )
    for i, episode in enumerate(episodes):
        if not isinstance(episode, dict) or set(episode) != {"completion_ids", "reward"}:
            return f'episodes[{i}] must be {{"completion_ids": [...], "reward": a number}}'
        ids = episode["completion_ids"]
        if (
            not isinstance(ids, list)
            or not 0 < len(ids) <= MAX_TURNS
            or not all(isinstance(c, str) and c for c in ids)
        ):
            return (
                f"episodes[{i}].completion_ids must be 1 to {MAX_TURNS} completion ids "
                "(cmpl_…), the episode's turns in order"
            )
        if not is_reward(episode["reward"]):
            return f"episodes[{i}].reward must be a finite number"
    source = row.get("source", TRAFFIC_SOURCE)
    if not isinstance(source, str) or not SOURCE.match(source):
        return "'source' is a label of 1-64 letters, digits, '_', '.' or '-'"
    return None


def resolve_traffic(
    session: Session, project: Project, run: Run, groups: list[tuple[int, dict]]
) -> tuple[list[dict], list[dict[str, str]]]:
    """(the groups in their stored form, problems as {"field", "message"}); `groups` are
    (index in the request, group) of valid traffic groups."""
    wanted = {c for _, g in groups for e in g["episodes"] for c in e["completion_ids"]}
    found: dict[str, Completion] = {}
    ordered = sorted(wanted)
    for start in range(0, len(ordered), QUERY_CHUNK):
        chunk = ordered[start : start + QUERY_CHUNK]
        found.update(
            (c.id, c)
            for c in session.scalars(
                select(Completion).where(
                    Completion.id.in_(chunk), Completion.project_id == project.id
                )
            )
        )
    stored, problems, seen = [], [], set()
    for index, group in groups:
        problem, episodes = None, []
        for i, episode in enumerate(group["episodes"]):
            turns = []
            for j, cid in enumerate(episode["completion_ids"]):
                where = f"episodes[{i}].completion_ids[{j}]"
                completion = found.get(cid)
                if completion is None:
                    problem = f"{where}: no completion {cid!r} recorded in this project"
                elif completion.run_id != run.id:
                    problem = (
                        f"{where}: {cid} was served by {completion.model}, not by run "
                        f"{run.id} or its checkpoints, whose tokenizer and weights this run trains"
                    )
                elif cid in seen:
                    problem = f"{where}: {cid} is in this request twice"
                if problem:
                    break
                seen.add(cid)
                turns.append(
                    {
                        "completion_id": cid,
                        "prompt_ids": completion.prompt_ids,
                        "token_ids": completion.token_ids,
                        "weights_step": completion.weights_step,
                    }
                )
            if problem:
                break
            episodes.append({"turns": turns, "reward": float(episode["reward"])})
        if problem:
            problems.append({"field": f"groups.{index}", "message": problem})
        else:
            source = group.get("source", TRAFFIC_SOURCE)
            stored.append({"traffic": episodes, "source": source})
    return stored, problems
