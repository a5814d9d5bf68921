"""What the benchmarks share: each side runs in a fresh subprocess with the same thread count
and prints one JSON line; the parent prints a markdown table. Ours runs the worker's code path
on a run created through the service layer (`submit_run`, `execute`); TRL runs `GRPOTrainer`
built by `grpo_trainer` with a built-in reward (`trl_reward`)."""

import argparse
import json
import math
import os
import subprocess
import sys


def parse_or_work(ap: argparse.ArgumentParser, sides: list[str], worker) -> argparse.Namespace:
    """Parse the command line. In a side's subprocess (the hidden flags run_side passes), run
    `worker(args)` for that side and size, print its result as one JSON line, and exit."""
    ap.add_argument("--worker", choices=sides, help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.side = args.worker
        print(json.dumps(worker(args)))
        sys.exit(0)
    return args


def pin_cores(n: int) -> list[int]:
    """Restrict this process (and every thread it starts later) to the first n cores it may
    use: a side's thread budget holds whatever threads a library starts."""
    cores = sorted(os.sched_getaffinity(0))[:n]
    if len(cores) < n:
        sys.exit(f"--threads {n}: this process may use only {len(cores)} cores")
    os.sched_setaffinity(0, cores)
    return cores


def read_rows(path) -> list[dict]:
    """A JSONL file's rows."""
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def run_side(
    script: str, side: str, size: str, model_dir: str, threads: int, extra: list[str]
) -> dict:
    cmd = [
        sys.executable,
        script,
        "--worker",
        side,
        "--size",
        size,
        "--model-dir",
        model_dir,
        "--threads",
        str(threads),
        *extra,
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    }
    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, check=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def check_threads(results: dict, size: str, threads: int) -> None:
    """vLLM's CPU worker pins torch's thread count: a side that ended with another count is
    not comparable."""
    for side, r in results.items():
        if r.get("threads_after", threads) != threads:
            print(
                f"note: {size}/{side} ended with torch threads = {r['threads_after']}",
                file=sys.stderr,
            )


def print_table(caption: str, head: list[str], rows: list[list[str]]) -> None:
    print(f"\n{caption}\n")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(len(ordered) * q / 100) - 1)] if ordered else float("nan")


# --- ours: a run through the service layer, run by the worker's code path in this process -------


def worker_settings(data_dir, threads: int, rollout_threads: int, max_lag: int):
    """The worker's settings for a side of `threads` threads: an async run (max_lag > 0) gives
    `rollout_threads` of them to its rollout thread and the rest to the learner."""
    from service.config import Settings

    rollout = rollout_threads if max_lag else 0
    return Settings(
        data_dir=data_dir, torch_threads=threads - rollout, rollout_threads=rollout or None
    )


def submit_run(
    settings, spec: dict, rows: list[dict], filename: str, eval_rows: list[dict] | None = None
) -> str:
    """Create a run as tests/helpers.py `submit()` does: a project with an API key, `rows`
    uploaded as its train file (and `eval_rows` as its eval file), then the run of `spec` (its
    dataset set to those files)."""
    import io

    from service.auth.service import create_api_key
    from service.contract.spec import RunSpec
    from service.db import session_scope
    from service.files.service import create_file
    from service.runs.service import create_run

    with session_scope(settings.resolved_database_url) as session:
        project, _ = create_api_key(session, "bench")

        def upload(rows: list[dict], name: str, purpose: str) -> str:
            data = io.BytesIO("".join(json.dumps(r) + "\n" for r in rows).encode())
            return create_file(session, settings, project, data, name, purpose).id

        dataset = {"train_file": upload(rows, filename, "train")}
        if eval_rows is not None:
            dataset["eval_file"] = upload(eval_rows, f"eval-{filename}", "eval")
        spec = {**spec, "dataset": dataset}
        run, _ = create_run(session, settings, project, RunSpec.model_validate(spec), None)
        return run.id


def execute(settings, run_id: str) -> None:
    """Run it to the end with `workers.execute.execute_run`; exit with its error unless it
    succeeded."""
    from service.contract.states import RunStatus
    from service.db import session_scope
    from service.models import Run
    from workers.execute import execute_run

    status = execute_run(settings, run_id, "bench")
    if status != RunStatus.SUCCEEDED:
        with session_scope(settings.resolved_database_url) as session:
            sys.exit(f"ours: run {status}: {session.get(Run, run_id).error}")


def run_metrics(settings, run_id: str) -> dict[str, dict[int, float]]:
    """The run's metrics: {name: {step: value}}."""
    from sqlalchemy import select

    from service.db import session_scope
    from service.models import Metric

    metrics: dict[str, dict[int, float]] = {}
    with session_scope(settings.resolved_database_url) as session:
        for m in session.scalars(select(Metric).where(Metric.run_id == run_id)):
            metrics.setdefault(m.name, {})[m.step] = m.value
    return metrics


# --- TRL ---------------------------------------------------------------------------------------


def trl_reward(name: str):
    """Our built-in reward `name` as a TRL reward function over the rows' `answer` column
    (TRL logs it under the function's name)."""
    from service.contract.rewards import BUILTIN_REWARDS
    from workers.rewards.builtin import get_reward

    score, params = get_reward(name).fn, BUILTIN_REWARDS[name]()

    def reward(completions, answer, **_):
        return [score(c, a, params) for c, a in zip(completions, answer, strict=True)]

    reward.__name__ = name
    return reward


def grpo_trainer(
    model_dir: str,
    rows: list[dict],
    reward: str,
    shape: tuple[int, int, int],
    *,
    lr: float,
    grad_clip: float,
    steps: int,
    seed: int,
    callbacks: list,
):
    """TRL's GRPOTrainer on `rows` with P prompts x k completions of at most L tokens a step
    (`shape` = (P, k, L)), temperature 1, top_p 1, a constant learning rate, float32 on CPU, and
    TRL's defaults otherwise, except those that would make its steps incomparable with ours:
    no vLLM (transformers generate() on the policy itself, so no weight sync), no gradient
    checkpointing (on by default in GRPOConfig, off in ours), no saving of its own."""
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    P, k, L = shape
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"),
        report_to="none",
        save_strategy="no",
        per_device_train_batch_size=P * k,
        num_generations=k,
        max_completion_length=L,
        temperature=1.0,
        top_p=1.0,
        learning_rate=lr,
        max_grad_norm=grad_clip,
        lr_scheduler_type="constant",
        use_vllm=False,
        gradient_checkpointing=False,
        use_cpu=True,
        max_steps=steps,
        logging_steps=1,
        disable_tqdm=True,
        seed=seed,
        # GRPOConfig defaults to bf16=True, i.e. bf16 autocast even on CPU; ours runs float32 on
        # CPU, so TRL does too (on CPUs with bf16 units autocast makes its passes ~2x cheaper).
        bf16=False,
    )
    return GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        reward_funcs=trl_reward(reward),
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        callbacks=callbacks,
    )
