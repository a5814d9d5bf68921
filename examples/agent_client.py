"""An agent trained from its own traffic, with nothing but the official `openai` SDK.

The agent plays a two-turn game: asked to write the letter "a", it answers; told "again", it
answers once more; its reward is the share of "a" in what it wrote. Each turn is a chat
completion from a gvpo-service run (`model` = the run's id), sent with
`metadata={"gvpo_episode": ...}` so the service records the exact tokens it served. After each
round the agent posts its episodes to the run, k games of one prompt per group, as completion
ids with rewards (POST /v1/runs/{id}/groups); the run trains on them with GVPO and publishes its
new weights every serving.sync_every_steps steps, which the served model follows.

The agent does not wait for the run: it keeps up to --ahead rounds posted and untrained, so the
episodes a step trains on were served by weights several updates old. GVPO trains on them
exactly, with no log-probs and no importance weights: its optimum does not depend on which
policy sampled a group.

    export GVPO_API_URL=http://127.0.0.1:8000 GVPO_API_KEY=gvpo_sk_...
    python examples/agent_client.py --model /path/to/model     # makes a run for the game
    python examples/agent_client.py --run run_...              # or plays against yours

Prints each round's mean reward and which weights served it, then the run's own figures.
"""

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai

LETTER = "a"
PROMPT = f'Write the letter "{LETTER}".'
FOLLOW_UP = "Again."
TURN_TOKENS = 4


def run_spec(model: str, train_file: str, steps: int, k: int, groups: int) -> dict:
    """A run that trains only on the episodes posted to it, and publishes every step."""
    return {
        "name": "agent-from-traffic",
        "model": {"path": model},
        "dataset": {"train_file": train_file},  # the game's prompt; the agent plays it
        "algorithm": {"group_size": k},
        "sampling": {"max_new_tokens": TURN_TOKENS},  # the run samples nothing itself
        "optimizer": {"lr": 1e-2},
        "training": {
            "steps": steps,
            "prompts_per_step": groups,
            "mini_batches": 1,
            "offpolicy_fraction": 1.0,  # every group of a step is posted...
            "wait_for_groups": True,  # ...and a step waits for them
        },
        "serving": {"sync_every_steps": 1},
        "checkpoint": {"every_steps": steps},
        # The run scores nothing itself (the agent's groups carry their rewards); a run spec
        # names a reward all the same.
        "reward": {"type": "builtin", "name": "char_accuracy"},
    }


def make_run(client: openai.OpenAI, model: str, steps: int, k: int, groups: int) -> str:
    rows = "".join(json.dumps({"prompt": PROMPT, "answer": LETTER * 8}) + "\n" for _ in range(4))
    train = client.files.create(file=("game.jsonl", rows.encode()), purpose="train")
    created = client.post(
        "/runs", body=run_spec(model, train.id, steps, k, groups), cast_to=httpx.Response
    )
    return created.json()["id"]


def wait_until_served(client: openai.OpenAI, run_id: str, timeout: float = 600.0) -> None:
    """A run is a model once it has started and published its first weights."""
    deadline = time.monotonic() + timeout
    while run_id not in {m.id for m in client.models.list().data}:
        if time.monotonic() > deadline:
            raise SystemExit(f"{run_id} published no weights in {timeout:.0f} s: is a worker up?")
        time.sleep(1.0)


def play(client: openai.OpenAI, run_id: str, name: str) -> dict:
    """One game: (its completion ids, reward, the weights steps that served it)."""
    messages = [{"role": "user", "content": PROMPT}]
    ids, said, served_by = [], "", []
    for _ in range(2):
        answer = client.chat.completions.create(
            model=run_id,
            messages=messages,
            max_tokens=TURN_TOKENS,
            temperature=1.0,
            metadata={"gvpo_episode": name},
        )
        content = answer.choices[0].message.content or ""
        ids.append(answer.id)  # with n = 1, the response id is the completion's
        served_by.append(answer.model_extra.get("weights_step"))
        said += content
        messages += [
            {"role": "assistant", "content": content},
            {"role": "user", "content": FOLLOW_UP},
        ]
    reward = said.count(LETTER) / max(len(said), 1)
    return {"completion_ids": ids, "reward": reward, "served_by": served_by}


def run_state(client: openai.OpenAI, run_id: str) -> tuple[dict, dict]:
    run = client.get(f"/runs/{run_id}", cast_to=httpx.Response).json()
    groups = client.get(f"/runs/{run_id}/groups", cast_to=httpx.Response).json()
    return run, groups


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="a model folder the service can read: make a run on it")
    which.add_argument("--run", help="play against this run (made like run_spec() makes one)")
    parser.add_argument("--steps", type=int, default=30, help="the made run's training steps")
    parser.add_argument("--k", type=int, default=8, help="games per group (the group size)")
    parser.add_argument("--groups", type=int, default=4, help="groups per round (and per step)")
    parser.add_argument("--ahead", type=int, default=3, help="rounds posted ahead of training")
    parser.add_argument("--concurrency", type=int, default=16, help="games played at once")
    parser.add_argument("--json", help="write the rounds' figures to this file")
    args = parser.parse_args()

    api = os.environ.get("GVPO_API_URL", "http://127.0.0.1:8000").rstrip("/")
    client = openai.OpenAI(base_url=f"{api}/v1", api_key=os.environ["GVPO_API_KEY"], timeout=600)
    run_id = args.run or make_run(client, args.model, args.steps, args.k, args.groups)
    print(f"waiting for {run_id} to start", flush=True)
    wait_until_served(client, run_id)
    print(f"playing against {run_id}", flush=True)

    rounds = []
    with ThreadPoolExecutor(args.concurrency) as pool:
        while True:
            run, groups = run_state(client, run_id)
            if run["status"] in ("succeeded", "failed", "cancelled"):
                break
            wanted = run["total_steps"] * args.groups - groups["pending"] - groups["trained"]
            if groups["pending"] or wanted <= 0:  # the run is busy with what it has
                time.sleep(0.5)
                continue
            # Play --ahead + 1 steps' worth at once, all served by the weights of now: the run
            # then trains the last of them --ahead updates after the weights that served it.
            batch = min(args.ahead + 1, wanted // args.groups)
            size = args.groups * args.k
            names = [f"r{len(rounds) + i // size}-{i % size}" for i in range(batch * size)]
            games = list(pool.map(lambda name: play(client, run_id, name), names))
            for r in range(batch):
                mine = games[r * size : (r + 1) * size]
                posted = [
                    {
                        "episodes": [
                            {"completion_ids": g["completion_ids"], "reward": g["reward"]}
                            for g in mine[i * args.k : (i + 1) * args.k]
                        ]
                    }
                    for i in range(args.groups)
                ]
                client.post(
                    f"/runs/{run_id}/groups", body={"groups": posted}, cast_to=httpx.Response
                )
                served = sorted({s for g in mine for s in g["served_by"]})
                reward = sum(g["reward"] for g in mine) / len(mine)
                rounds.append({"round": len(rounds), "reward": reward, "served_by": served})
                print(
                    f"round {len(rounds) - 1:3d}  reward {reward:.3f}  served by the weights of "
                    f"step {served}, trained at step {groups['trained'] // args.groups + r + 1}",
                    flush=True,
                )

    metrics = client.get(f"/runs/{run_id}/metrics", cast_to=httpx.Response).json()["metrics"]
    staleness = [v for _, v in metrics.get("offpolicy/staleness_mean", [])]
    oldest = [v for _, v in metrics.get("offpolicy/staleness_max", [])]
    print(f"the run {run['status']}: {run['step']} steps")
    if staleness:
        print(
            f"staleness of the trained episodes: mean {sum(staleness) / len(staleness):.2f}, "
            f"oldest {max(oldest):.0f} updates"
        )
    if len(rounds) >= 2:
        head, tail = rounds[: max(1, len(rounds) // 5)], rounds[-max(1, len(rounds) // 5) :]
        print(
            f"reward: first rounds {sum(r['reward'] for r in head) / len(head):.3f}, "
            f"last rounds {sum(r['reward'] for r in tail) / len(tail):.3f}"
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {
                    "run_id": run_id,
                    "status": run["status"],
                    "rounds": rounds,
                    "staleness": staleness,
                    "staleness_max": oldest,
                },
                out,
            )
    return 0 if run["status"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
