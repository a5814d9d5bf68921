"""`gvpo demo`: the main job end to end on the embedded stack, on a task a tiny model learns fast.

The task: copy a 3-letter string ("bdj=" -> "bdj") with partial credit (char_accuracy). The
tiny model starts from random weights, so early rewards are near zero. The run uses GVPO's
defaults, chosen by the algorithm study (docs/algorithms.md): the initial model as reference
with a small beta, whose KL anchor keeps each group diverse long enough to learn (the
sampling-policy reference collapsed to one output per prompt on this task), and 16 completions
per prompt. `--task episodes` plays two-turn episodes of the built-in secret_code environment
instead (docs/episodes.md), with the same settings but for shorter turns.
"""

import json
import random
from pathlib import Path

from rich.console import Console

from service.config import Settings
from service.contract.events import EventType
from service.contract.states import RunStatus
from service.stack import Stack, free_port

LETTERS = "abcdefghij"
DEMO_STEPS = 400
MODEL = "tiny-demo"  # the name the demo registers its model under


def write_dataset(path: Path, rows: int = 500, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for _ in range(rows):
            word = "".join(rng.choice(LETTERS) for _ in range(3))
            fh.write(json.dumps({"prompt": f"{word}=", "answer": word}) + "\n")
    return path


def write_episodes_dataset(path: Path, rows: int = 500, seed: int = 0) -> Path:
    """secret_code's chat rows: the same question, each row's own code as its answer."""
    from workers.environments.builtin import secret_code_rows

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in secret_code_rows(rows, seed)))
    return path


def episodes_spec(model: str, train_file: str, steps: int) -> dict:
    """Two-turn episodes of the built-in secret_code environment: the code the policy must
    repeat is only in what the environment says after its first turn."""
    spec = demo_spec(model, train_file, steps)
    spec["name"] = "demo-secret-code-episodes"
    spec["sampling"]["max_new_tokens"] = 4
    spec["algorithm"]["beta"] = 0.05  # at 0.01 the reward was 0.2 after 500 steps
    spec["environment"] = {"type": "builtin", "name": "secret_code", "max_turns": 2}
    spec["reward"] = {"type": "builtin", "name": "exact_match"}  # the environment scores
    return spec


def demo_spec(model: str, train_file: str, steps: int) -> dict:
    return {
        "name": "demo-copy3-gvpo",
        "model": {"path": model, "dtype": "float32"},
        "dataset": {"train_file": train_file},
        # GVPO's defaults (beta 0.01, the initial model as reference, every group trained);
        # 16 completions a prompt: at 8 the reward was still about 0.45 after 250 steps
        "algorithm": {"name": "gvpo", "group_size": 16},
        "sampling": {"temperature": 1.0, "max_new_tokens": 5},
        "optimizer": {"lr": 1e-3, "grad_clip": 1.0},
        "training": {"steps": steps, "prompts_per_step": 8, "mini_batches": 1, "seed": 0},
        "reward": {"type": "builtin", "name": "char_accuracy"},
        "checkpoint": {"every_steps": max(1, steps // 4), "keep_last": 2},
    }


# task -> (its dataset writer, its run spec, its default steps)
TASKS = {
    "copy": (write_dataset, demo_spec, DEMO_STEPS),
    "episodes": (write_episodes_dataset, episodes_spec, 500),
}


def reward_curve(points: list[list[float]], rows: int = 20, width: int = 40) -> list[str]:
    """Text chart: the mean reward of each slice of steps, as a bar."""
    if not points:
        return []
    size = max(1, len(points) // rows)
    lines = []
    for start in range(0, len(points), size):
        chunk = points[start : start + size]
        mean = sum(v for _, v in chunk) / len(chunk)
        label = f"steps {int(chunk[0][0]):>5}-{int(chunk[-1][0]):<5}"
        lines.append(f"{label} {mean:5.3f} {'█' * round(mean * width)}")
    return lines


def _prepare(settings: Settings, console: Console, task: str) -> tuple[Path, str]:
    from service.auth.service import create_api_key
    from service.db import session_scope
    from service.migrate import prepare
    from service.registry.service import register_model
    from workers.tiny_model import make_tiny_model

    prepare(settings)
    demo_dir = settings.resolved_data_dir / "demo"
    # Beside the data directory, never in it: no run may load a model from there.
    model_dir = settings.resolved_data_dir.with_name(f"{settings.data_dir.name}-models") / MODEL
    if not (model_dir / "config.json").exists():
        console.log(f"building the offline tiny model in {model_dir}")
        make_tiny_model(model_dir, seed=0)
    dataset = TASKS[task][0](demo_dir / f"{task}.jsonl")
    with session_scope(settings.resolved_database_url) as session:
        register_model(session, settings, MODEL, str(model_dir))
        _, key = create_api_key(session, "demo", settings.api_key_pepper)
    console.log(f"registered it as the base model {MODEL!r} (gvpo models list)")
    return dataset, key


def run_demo(
    settings: Settings, steps: int | None = None, port: int | None = None, task: str = "copy"
) -> int:
    """`task`: "copy" (the main job) or "episodes" (two-turn episodes with an environment)."""
    from gvpo_client import Client
    from service.progress import follow_run

    console = Console()
    settings = settings.model_copy(
        update={"api_port": port or free_port(), "grpc_port": free_port()}
    )
    dataset, key = _prepare(settings, console, task)
    _, make_spec, default_steps = TASKS[task]
    log_dir = settings.resolved_data_dir / "logs"
    console.log(f"starting the API on port {settings.api_port} and a worker (logs in {log_dir})")
    with Stack(settings, log_dir=log_dir) as stack, Client(stack.url, key) as client:
        uploaded = client.upload_file(dataset)
        console.log(f"uploaded {uploaded['rows']} rows as {uploaded['id']}")
        run = client.create_run(make_spec(MODEL, uploaded["id"], steps or default_steps))
        spec = run["spec"]
        console.log(
            f"submitted {run['id']}: GVPO, k={spec['algorithm']['group_size']}, "
            f"{spec['training']['prompts_per_step']} prompts/step, {run['total_steps']} steps"
        )
        run = follow_run(client, run["id"], console)
        curves = client.metrics(run["id"], ["reward/mean", "rollout/logprob_diff_max"])
        curve = curves.get("reward/mean", [])
        gaps = [v for _, v in curves.get("rollout/logprob_diff_max", [])]
        loaded = [e for e in client.events(run["id"]) if e["type"] == EventType.RUN_MODEL_LOADED]
        checkpoints = client.checkpoints(run["id"])
    if run["status"] != RunStatus.SUCCEEDED:
        console.print(f"[red]run {run['status']}: {run['error']}")
        return 1
    console.print("\n[bold]reward/mean over training[/bold]")
    for line in reward_curve(curve):
        console.print(line)
    head, tail = curve[: max(1, len(curve) // 10)], curve[-max(1, len(curve) // 10) :]
    console.print(
        f"\nreward/mean: first 10% of steps {sum(v for _, v in head) / len(head):.3f} -> "
        f"last 10% {sum(v for _, v in tail) / len(tail):.3f}"
    )
    engine = loaded[-1]["data"]["rollout_engine"] if loaded else "unknown"
    console.print(
        f"rollouts: {engine}"
        + (
            f" (its sampled-token log-probs vs the learner's: max gap {max(gaps):.1e})"
            if gaps
            else ""
        )
    )
    final = checkpoints[-1]
    folder = _checkpoint_folder(settings, final["id"])  # the operator's view: the API hides it
    console.print(f"final checkpoint (step {final['step']}): {final['id']} in {folder}")
    console.print(f"load it with: AutoModelForCausalLM.from_pretrained({folder!r})")
    return 0


def _checkpoint_folder(settings: Settings, ckpt_id: str) -> str:
    from service.db import session_scope
    from service.models import Checkpoint

    with session_scope(settings.resolved_database_url) as session:
        return session.get(Checkpoint, ckpt_id).path
