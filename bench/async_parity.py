"""Benchmark: does async GVPO (training.max_lag) learn as much per step as the synchronous loop?

    .venv/bin/python bench/async_parity.py [--tasks copy,arithmetic] [--seeds 0,1,2]
        [--lags 0,1] [--threads 2] [--rollout-threads 1]

Each (task, max_lag, seed) is one real run (`workers.execute.execute_run` on a run created
through the service layer in a temporary data directory, vLLM rollouts where installed), in a
subprocess of its own confined to --threads cores. Synchronous runs give the learner every
thread; async runs give --rollout-threads to the thread that samples and the rest to the
learner. Only the lag and the seed (training.seed) differ between runs of a task.

- copy: `gvpo demo`'s run (service/demo.py demo_spec: the untrained tiny model copies a
  3-letter string, char_accuracy, GVPO's defaults with 16 completions, lr 1e-3) for --steps
  (default 400, the demo's). Reported: the mean training reward of the first and last 10% of
  the steps, and the first step whose 20-step mean reward reaches 0.5.
- arithmetic: the warm-started small model of bench/warmstart.py (seed 0), its train and eval
  files, exact_match, GVPO's defaults with k 8, 16 prompts a step, lr 1e-4 (the algorithm
  study's best), 8 new tokens, for --steps-arithmetic steps (default 150); the run's own
  evaluation (4 samples on each of the 200 held-out prompts, temperature 1) at the start, every
  50 steps and at the end. Reported: held-out pass@1 at the end and the mean training reward of
  the last 10% of the steps.

Each row is the mean ± sample standard deviation over the seeds, with min..max, and the median
seconds per step (time/step_s for async runs, else the sum of the phases) and the whole run's
seconds. "Within the spread" asks whether the async runs' range overlaps the synchronous ones'.
Results go to bench/.cache/async_parity.json.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CACHE = ROOT / "bench" / ".cache"
PHASES = ("weight_sync", "rollout", "reward", "learn")


def copy_spec(model_dir: str, args) -> dict:
    from service.demo import demo_spec

    spec = demo_spec(model_dir, "", args.steps)
    spec["checkpoint"] = {"every_steps": 10**6, "keep_last": 1}
    return spec


def arithmetic_spec(model_dir: str, args) -> dict:
    return {
        "model": {"path": model_dir, "dtype": "float32"},
        "algorithm": {"group_size": 8},
        "sampling": {"temperature": 1.0, "max_new_tokens": 8},
        "optimizer": {"lr": 1e-4},
        "training": {"steps": args.steps_arithmetic, "prompts_per_step": 16},
        "reward": {"type": "builtin", "name": "exact_match"},
        "eval": {"every_steps": 50, "samples_per_prompt": 4, "max_prompts": 200},
        "checkpoint": {"every_steps": 10**6, "keep_last": 1},
    }


def task_files(task: str, tmp: Path) -> tuple[str, list[dict], list[dict] | None]:
    """(model folder, train rows, eval rows) of a task."""
    if task == "copy":
        from service.demo import write_dataset
        from workers.tiny_model import make_tiny_model

        model = make_tiny_model(tmp / "tiny", seed=0)
        return str(model), common.read_rows(write_dataset(tmp / "copy.jsonl")), None
    from bench.warmstart import warmstart

    folder = warmstart("arithmetic", seed=0, size="small")
    train, evals = (common.read_rows(folder / f"{name}.jsonl") for name in ("train", "eval"))
    return str(folder), train, evals


def one_run(args) -> dict:
    """A run's subprocess: one run of --task with --max-lag and --seed."""
    common.pin_cores(args.threads)
    from service.migrate import prepare

    with tempfile.TemporaryDirectory(prefix="bench-parity-") as tmp:
        model, train, evals = task_files(args.task, Path(tmp))
        spec = (copy_spec if args.task == "copy" else arithmetic_spec)(model, args)
        spec["training"] |= {"seed": args.seed, "max_lag": args.max_lag}
        settings = common.worker_settings(
            Path(tmp) / "gvpo", args.threads, args.rollout_threads, args.max_lag
        )
        prepare(settings)
        run_id = common.submit_run(settings, spec, train, f"{args.task}.jsonl", evals)
        start = time.perf_counter()
        common.execute(settings, run_id)
        wall = time.perf_counter() - start
        metrics = common.run_metrics(settings, run_id)
    steps = sorted(metrics["reward/mean"])
    if args.max_lag:
        times = [metrics["time/step_s"][s] for s in steps]
    else:
        times = [sum(metrics[f"time/{p}_s"][s] for p in PHASES) for s in steps]
    return {
        "rewards": [metrics["reward/mean"][s] for s in steps],
        "eval": metrics.get("eval/pass@1", {}),
        "step_s": statistics.median(times),
        "wall_s": wall,
    }


def summary(task: str, res: dict) -> dict[str, float]:
    rewards = res["rewards"]
    tenth = max(1, len(rewards) // 10)
    out = {
        "first 10% reward": statistics.mean(rewards[:tenth]),
        "last 10% reward": statistics.mean(rewards[-tenth:]),
    }
    if task == "copy":
        window = [statistics.mean(rewards[max(0, i - 19) : i + 1]) for i in range(len(rewards))]
        out["step to 0.5"] = next((i + 1 for i, v in enumerate(window) if v >= 0.5), math.nan)
    else:
        final = max(res["eval"], key=int)
        out["held-out pass@1"] = res["eval"][final]
    out["s/step"] = res["step_s"]
    out["run s"] = res["wall_s"]
    return out


def spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    digits = 0 if abs(mean) >= 10 else 3
    return (
        f"{mean:.{digits}f} ± {std:.{digits}f} ({min(values):.{digits}f}..{max(values):.{digits}f})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="copy,arithmetic")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--lags", default="0,1")
    ap.add_argument("--steps", type=int, default=400, help="copy's steps")
    ap.add_argument("--steps-arithmetic", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rollout-threads", type=int, default=1)
    ap.add_argument("--task", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--max-lag", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.task:  # a run's subprocess
        print(json.dumps(one_run(args)))
        return
    results: dict[str, dict] = {}
    for task in args.tasks.split(","):
        for lag in map(int, args.lags.split(",")):
            for seed in map(int, args.seeds.split(",")):
                cmd = [
                    sys.executable,
                    __file__,
                    *("--task", task, "--seed", str(seed), "--max-lag", str(lag)),
                    *("--threads", str(args.threads)),
                    *("--rollout-threads", str(args.rollout_threads)),
                    *("--steps", str(args.steps)),
                    *("--steps-arithmetic", str(args.steps_arithmetic)),
                ]
                env = {
                    **os.environ,
                    "OMP_NUM_THREADS": str(args.threads),
                    "TOKENIZERS_PARALLELISM": "false",
                    "VLLM_LOGGING_LEVEL": "WARNING",
                }
                out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, check=True, text=True)
                res = json.loads(out.stdout.strip().splitlines()[-1])
                results[f"{task}/lag{lag}/seed{seed}"] = res
                print(f"{task} max_lag {lag} seed {seed}: {summary(task, res)}", file=sys.stderr)
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "async_parity.json").write_text(json.dumps(results, indent=1) + "\n")
    for task in args.tasks.split(","):
        rows = {
            lag: [summary(task, r) for k, r in results.items() if k.startswith(f"{task}/lag{lag}/")]
            for lag in map(int, args.lags.split(","))
        }
        names = list(next(iter(rows.values()))[0])
        print(f"\n{task}: {args.threads} threads a run, seeds {args.seeds}\n")
        print("| max_lag | " + " | ".join(names) + " |")
        print("| --- " * (len(names) + 1) + "|")
        for lag, runs in rows.items():
            print(f"| {lag} | " + " | ".join(spread([r[n] for r in runs]) for n in names) + " |")


if __name__ == "__main__":
    main()
