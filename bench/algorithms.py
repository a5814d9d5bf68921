"""GVPO against GRPO and Dr. GRPO on tasks a CPU can run, with the same rollout budget per arm.

    python bench/algorithms.py                  # the default grid on the warm-started arithmetic
    python bench/algorithms.py --task copy      # the demo's task from the untrained tiny model
    python bench/algorithms.py --full           # a wider grid (longer)

Every arm trains the same starting model (bench/warmstart.py's cached one for arithmetic) with
the service's own learner (workers/learner) and transformers rollout engine, in one process per
(arm, learning rate, seed) at one thread, `--jobs` at a time. Every arm sees the same number of
prompts x completions per step and the same steps, so the same rollouts budget; what differs is
the objective and its settings. Recorded per run: the training reward and the learner's
statistics per step, train seconds (evaluation excluded), and every `eval_every` steps the
held-out pass@1 and pass@k from n samples per prompt at temperature 1 and the KL of the policy to
the starting model, estimated on those samples.

The results go to bench/.cache/algorithms/<task>.json; the table (mean +- sample std over seeds,
with min..max) replaces the marked block of docs/algorithms.md and the plots go to
docs/img/algorithms-<task>-*.{png,svg}.
"""

import argparse
import copy
import json
import math
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import matplotlib
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.tasks import get_task  # noqa: E402
from bench.warmstart import warmstart  # noqa: E402
from service.contract.rewards import BUILTIN_REWARDS  # noqa: E402
from service.contract.spec import AlgorithmSpec, OptimizerSpec, SamplingSpec  # noqa: E402
from workers.data import PromptSampler, load_examples  # noqa: E402
from workers.evaluation import eval_metrics  # noqa: E402
from workers.learner.learner import GroupBatch, Learner, LearnerConfig  # noqa: E402
from workers.learner.logprobs import build_batch, sequence_logprobs  # noqa: E402
from workers.rewards.builtin import get_reward  # noqa: E402
from workers.rollout.hf import HFRolloutEngine  # noqa: E402
from workers.tiny_model import make_tiny_model  # noqa: E402

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

# Text as text (not glyph outlines) and fixed ids: smaller SVGs that change only with the data.
matplotlib.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "gvpo"})

CACHE = ROOT / "bench" / ".cache"
DOC = ROOT / "docs" / "algorithms.md"
IMG = ROOT / "docs" / "img"
BEGIN, END = "<!-- algorithms:{task}:begin -->", "<!-- algorithms:{task}:end -->"


@dataclass(frozen=True)
class Arm:
    """One objective with its settings; each runs at every learning rate of its grid."""

    name: str  # gvpo, grpo, dr_grpo
    beta: float
    reference: str = "sampling"
    skip_zero_variance: bool = True
    mini_batches: int | None = None  # None: the study's
    lrs: tuple[float, ...] = ()

    @property
    def label(self) -> str:
        parts = [self.name, f"b={self.beta:g}"]
        if self.name == "gvpo":
            parts.append(f"ref={self.reference}")
            parts.append("skip0" if self.skip_zero_variance else "keep0")
        if self.mini_batches is not None:
            parts.append(f"mb={self.mini_batches}")
        return " ".join(parts)


@dataclass(frozen=True)
class Study:
    task: str
    steps: int
    prompts_per_step: int
    group_size: int
    eval_every: int
    eval_samples: int  # n completions per held-out prompt; pass@k uses k = n
    eval_rows: int
    mini_batches: int  # optimizer updates per step, for every arm that names none
    seeds: tuple[int, ...]
    arms: tuple[Arm, ...]
    warm_seed: int = 0  # which warm-started model every arm starts from
    grad_clip: float | None = 1.0


@dataclass
class Job:
    study: Study
    arm: Arm
    lr: float
    seed: int
    start: str  # the starting model's folder


LRS = (3e-5, 1e-4)


def default_arms(lrs=LRS) -> tuple[Arm, ...]:
    """GVPO's three choices, each varied with the others fixed (reference: the two arms at
    beta 0.1 keeping zero-variance groups; beta: the two with the initial reference keeping
    them; zero-variance groups: both pairs that differ in that alone), beside GRPO and Dr. GRPO
    without and with their KL term. The first arm is the service's defaults before this study;
    the second is the authors' released code (sampling reference, every group kept)."""
    return (
        Arm("gvpo", 0.1, "sampling", lrs=lrs),
        Arm("gvpo", 0.1, "sampling", skip_zero_variance=False, lrs=lrs),
        Arm("gvpo", 0.1, "initial", skip_zero_variance=False, lrs=lrs),
        Arm("gvpo", 0.01, "initial", skip_zero_variance=False, lrs=lrs),
        Arm("gvpo", 0.01, "initial", lrs=lrs),
        # The baselines' KL term is to the starting model, as TRL's reference model is (with
        # the sampling policy as reference it would vanish at one update a step).
        Arm("grpo", 0.0, "initial", lrs=lrs),
        Arm("grpo", 0.04, "initial", lrs=lrs),
        Arm("dr_grpo", 0.0, "initial", lrs=lrs),
        Arm("dr_grpo", 0.04, "initial", lrs=lrs),
    )


def full_arms(lrs: tuple[float, ...]) -> tuple[Arm, ...]:
    """The default arms at four learning rates, and GVPO at three more betas with every
    reference, zero-variance and mini-batch choice."""
    extra = [
        Arm("gvpo", beta, ref, zv, mb, lrs)
        for beta in (0.003, 0.03, 0.3)
        for ref in ("sampling", "initial")
        for zv in (True, False)
        for mb in (1, 4)
    ]
    return default_arms(lrs) + tuple(extra)


def study_for(task: str, full: bool, seeds: int) -> Study:
    if task == "copy":
        # The demo's shape (8 prompts x 16 completions, one update a step, 250 steps) from the
        # untrained model, which needs larger steps than a warm-started one.
        arms = full_arms((2.5e-4, 5e-4, 1e-3, 2e-3)) if full else default_arms((5e-4, 1e-3))
        return Study(task, 250, 8, 16, 50, 8, 200, 1, tuple(range(seeds)), arms)
    arms = full_arms((1e-5, 3e-5, 1e-4, 3e-4)) if full else default_arms()
    return Study(task, 200, 16, 8, 100, 8, 200, 4, tuple(range(seeds)), arms)


# --- one run (in a worker process) -------------------------------------------------------------


def starting_model(task: str, seed: int, cache: Path) -> Path:
    """The folder every arm starts from: the warm-started model, or for copy the demo's tiny
    model untrained (built in `cache`)."""
    if task == "copy":
        folder = cache / "copy-start"
        if not (folder / "config.json").exists():
            tmp = folder.with_name(f".copy-start.{os.getpid()}")
            make_tiny_model(tmp, seed=0)  # as `gvpo demo` builds it
            tmp.rename(folder)
        return folder
    return warmstart(task, seed)


def run(job: Job) -> dict:
    torch.set_num_threads(1)
    study, arm = job.study, job.arm
    task = get_task(study.task)
    train_rows, eval_rows = task.split(study.warm_seed)
    eval_rows = eval_rows[: study.eval_rows]
    torch.manual_seed(job.seed)
    model = AutoModelForCausalLM.from_pretrained(job.start, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(job.start)
    start = copy.deepcopy(model).eval().requires_grad_(False)
    algorithm = AlgorithmSpec(
        name=arm.name,
        beta=arm.beta,
        group_size=study.group_size,
        reference=arm.reference,
        skip_zero_variance=arm.skip_zero_variance,
    )
    config = LearnerConfig(
        algorithm,
        OptimizerSpec(lr=job.lr, grad_clip=study.grad_clip),
        arm.mini_batches or study.mini_batches,
        None,
        task.max_new_tokens,
    )
    device = torch.device("cpu")
    learner = Learner(model, config, device, tokenizer.pad_token_id, initial_model=start)
    engine = HFRolloutEngine(model, tokenizer, device)
    sampling = SamplingSpec(temperature=1.0, max_new_tokens=task.max_new_tokens)
    sampler = PromptSampler(load_examples(train_rows, "prompt", "answer"), job.seed)
    score = scorer(task.reward)

    evals = [evaluate(model, start, tokenizer, eval_rows, study, task, score, job.seed, 0)]
    train_s, curve = 0.0, []
    for step in range(1, study.steps + 1):
        began = time.perf_counter()
        examples = sampler.next(study.prompts_per_step)
        rollouts = engine.generate([e.prompt for e in examples], study.group_size, sampling)
        rewards = scored(score, rollouts, [e.answer for e in examples])
        batch = GroupBatch(
            [r.prompt_ids for r in rollouts],
            [[c.token_ids for c in r.completions] for r in rollouts],
            rewards,
        )
        stats = learner.learn(batch, step)
        train_s += time.perf_counter() - began
        curve.append(
            [step, round(train_s, 3), float(rewards.mean()), stats.grad_norm, stats.kl_ref,
             stats.zero_variance_frac, stats.loss]
        )  # fmt: skip
        if not math.isfinite(stats.loss):
            break
        if step % study.eval_every == 0 or step == study.steps:
            evals.append(
                evaluate(model, start, tokenizer, eval_rows, study, task, score, job.seed, step)
            )
    return {
        "arm": asdict(arm) | {"label": arm.label},
        "lr": job.lr,
        "seed": job.seed,
        "curve": curve,  # [step, train s, reward mean, grad norm, kl to ref, zero-var, loss]
        "evals": evals,
        "train_seconds": round(train_s, 1),
        "diverged": not math.isfinite(curve[-1][-1]),
    }


def scorer(reward: str):

    fn, params = get_reward(reward).fn, BUILTIN_REWARDS[reward]()
    return lambda text, answer: fn(text, answer, params)


def scored(score, rollouts, answers: list[str]):
    """(P, k) rewards of each prompt's completions against its answer."""

    return torch.tensor(
        [
            [score(c.text, answer) for c in rollout.completions]
            for rollout, answer in zip(rollouts, answers, strict=True)
        ]
    )


def evaluate(model, start, tokenizer, rows, study: Study, task, score, seed: int, step: int):
    """Held-out pass@1 / pass@n and mean reward from n samples per prompt at temperature 1
    (its own RNG stream, so evaluating never shifts training), and KL(policy || start) per
    completion: the mean over those samples of log pi(y|x) - log pi_start(y|x)."""

    n = study.eval_samples
    sampling = SamplingSpec(temperature=1.0, max_new_tokens=task.max_new_tokens)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(10_000 * seed + step)
        rollouts = HFRolloutEngine(model, tokenizer, torch.device("cpu")).generate(
            [r["prompt"] for r in rows], n, sampling
        )
        rewards = scored(score, rollouts, [r["answer"] for r in rows])
        prompts = [ro.prompt_ids for ro in rollouts for _ in ro.completions]
        completions = [c.token_ids for ro in rollouts for c in ro.completions]
        batch = build_batch(prompts, completions, tokenizer.pad_token_id, torch.device("cpu"))
        was_training = model.training
        model.eval()
        logps = sequence_logprobs(model, batch).summed
        kl = (logps - sequence_logprobs(start, batch).summed).mean()
        model.train(was_training)
    metrics = eval_metrics(rewards, 1.0, n)
    return {
        "step": step,
        "pass@1": metrics["eval/pass@1"],
        f"pass@{n}": metrics["eval/pass@k"],
        "reward": metrics["eval/reward_mean"],
        "kl_to_start": float(kl),
    }


def _work(job: Job) -> dict:
    try:
        return run(job)
    except Exception as exc:  # one arm's failure is a row of the report, not the end of it
        return {"arm": asdict(job.arm) | {"label": job.arm.label}, "lr": job.lr,
                "seed": job.seed, "error": f"{type(exc).__name__}: {exc}"}  # fmt: skip


# --- summaries --------------------------------------------------------------------------------


def smooth(values: list[float], window: int = 10) -> list[float]:
    """Trailing mean over `window` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def run_summary(r: dict, study: Study) -> dict:
    """What one run ended with; the definitions are the docs' (docs/algorithms.md)."""
    curve = r["curve"]
    rewards = [c[2] for c in curve]
    tail = max(1, len(rewards) // 10)
    first, final = statistics.fmean(rewards[:tail]), statistics.fmean(rewards[-tail:])
    to_90 = None
    if final > first:  # the first full window whose mean is 90% of the way from first to final
        goal = first + 0.9 * (final - first)
        windows = smooth(rewards, tail)[tail - 1 :]
        to_90 = next(c[0] for c, m in zip(curve[tail - 1 :], windows, strict=True) if m >= goal)
    norms = [c[3] for c in curve if math.isfinite(c[3])]
    median = statistics.median(norms) if norms else math.nan
    last = r["evals"][-1]
    n = study.eval_samples
    return {
        "pass@1": last["pass@1"],
        f"pass@{n}": last[f"pass@{n}"],
        "start_pass@1": r["evals"][0]["pass@1"],
        "reward": final,
        "kl": last["kl_to_start"],
        "to_90": to_90,
        "spikes": sum(g > 5 * median for g in norms),
        # share of steps whose update the clip scaled down
        "clipped": sum(g > (study.grad_clip or math.inf) for g in norms) / max(len(norms), 1),
        "norm_max_med": max(norms) / median if norms and median > 0 else math.nan,
        "seconds": r["train_seconds"],
        "diverged": r["diverged"],
    }


def spread(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "–"
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def rows_of(results: list[dict], study: Study) -> list[dict]:
    """One row per (arm, lr): the seeds' summaries."""
    grouped: dict[tuple, list[dict]] = {}
    for r in results:
        grouped.setdefault((r["arm"]["label"], r["lr"]), []).append(r)
    rows = []
    for (label, lr), runs in grouped.items():
        ok = [r for r in runs if "error" not in r]
        rows.append(
            {
                "label": label,
                "lr": lr,
                "seeds": len(runs),
                "errors": [r["error"] for r in runs if "error" in r],
                "runs": [run_summary(r, study) for r in ok],
            }
        )
    return rows


def table(rows: list[dict], study: Study) -> str:
    n = study.eval_samples
    head = (
        f"| arm | lr | held-out pass@1 | pass@{n} | train reward (last 10%) | KL to start "
        "| steps to 90% | grad-norm spikes | steps clipped | train s | seeds |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for row in sorted(rows, key=lambda r: -_mean(r, "pass@1")):
        runs = row["runs"]
        p1 = [r["pass@1"] for r in runs]
        lo_hi = f" ({min(p1):.3f}..{max(p1):.3f})" if p1 else ""
        diverged = sum(r["diverged"] for r in runs)
        seeds = f"{len(runs)}" + (f", {diverged} diverged" if diverged else "")
        seeds += f", {len(row['errors'])} failed" if row["errors"] else ""
        lines.append(
            f"| {row['label']} | {row['lr']:g} | {spread(p1)}{lo_hi} "
            f"| {spread([r[f'pass@{n}'] for r in runs])} | {spread([r['reward'] for r in runs])} "
            f"| {spread([r['kl'] for r in runs], 2)} "
            f"| {spread([r['to_90'] for r in runs], 0)} "
            f"| {sum(r['spikes'] for r in runs)} "
            f"| {spread([100 * r['clipped'] for r in runs], 0)}% "
            f"| {spread([r['seconds'] for r in runs], 0)} | {seeds} |"
        )
    return head + "\n".join(lines) + "\n"


def _mean(row: dict, key: str) -> float:
    values = [r[key] for r in row["runs"] if r[key] is not None]
    return statistics.fmean(values) if values else -math.inf


def best_per_arm(results: list[dict]) -> dict[str, list[dict]]:
    """Each arm's runs at its best learning rate (by mean final held-out pass@1)."""
    by_arm: dict[str, dict[float, list[dict]]] = {}
    for r in results:
        if "error" not in r:
            by_arm.setdefault(r["arm"]["label"], {}).setdefault(r["lr"], []).append(r)

    def final(runs):
        return statistics.fmean(r["evals"][-1]["pass@1"] for r in runs)

    return {label: max(lrs.values(), key=final) for label, lrs in by_arm.items()}


def plot(results: list[dict], study: Study, out: Path) -> list[Path]:
    """Reward vs steps and vs train seconds, and held-out pass@1 vs steps: each arm at its best
    learning rate, the mean over seeds."""
    best = best_per_arm(results)
    window = max(1, study.steps // 10)
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    colours = plt.get_cmap("tab10")(np.linspace(0, 1, max(len(best), 2)))
    for colour, (label, runs) in zip(colours, sorted(best.items()), strict=False):
        length = min(len(r["curve"]) for r in runs)
        steps = np.array([c[0] for c in runs[0]["curve"][:length]])
        rewards = np.mean([smooth([c[2] for c in r["curve"][:length]], window) for r in runs], 0)
        seconds = np.mean([[c[1] for c in r["curve"][:length]] for r in runs], axis=0)
        name = f"{label}, lr {runs[0]['lr']:g}"
        axes[0].plot(steps, rewards, color=colour, label=name, linewidth=1.2)
        axes[1].plot(seconds, rewards, color=colour, linewidth=1.2)
        eval_steps = [e["step"] for e in runs[0]["evals"]]
        p1 = np.array([[e["pass@1"] for e in r["evals"]] for r in runs])
        axes[2].errorbar(eval_steps, p1.mean(0), yerr=p1.std(0), color=colour, capsize=3)
    titles = (
        f"training reward ({window}-step mean, mean of seeds) vs step",
        "the same vs train seconds",
        "held-out pass@1 vs step (mean ± std over seeds)",
    )
    for ax, title, xlabel in zip(axes, titles, ("step", "seconds", "step"), strict=True):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"{study.task}: {len(study.seeds)} seeds per arm, best learning rate of each arm")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "svg"):
        path = out / f"algorithms-{study.task}.{ext}"
        fig.savefig(path, dpi=72, metadata={"Date": None} if ext == "svg" else {"Software": None})
        paths.append(path)
    plt.close(fig)
    return paths


def report(results: list[dict], study: Study, made_by: list, jobs: int) -> str:
    """The docs block; `made_by`: [command, seconds] of each run whose results it shows."""
    best = best_per_arm(results)
    n = study.eval_samples
    commands = ", then ".join(f"`{command}` ({wall / 60:.1f} min)" for command, wall in made_by)
    lines = [
        f"Made by {commands} on {jobs} process(es) of one torch thread "
        f"each ({os.cpu_count()} cores, {platform.machine()}, torch {torch.__version__}). "
        f"{study.steps} steps x {study.prompts_per_step} prompts x {study.group_size} completions "
        f"per run; held-out set {study.eval_rows} prompts x {n} samples at temperature 1; seeds "
        f"{', '.join(map(str, study.seeds))}; grad clip {study.grad_clip}. Rows sorted by "
        "held-out pass@1; ± is the sample standard deviation over seeds, (a..b) the seeds' range.",
        "",
        table(rows_of(results, study), study),
        f"![{study.task}: reward and pass@1 curves](img/algorithms-{study.task}.svg)",
        "",
        "Best learning rate of each arm (the curves above): "
        + "; ".join(
            f"{label} {runs[0]['lr']:g}"
            for label, runs in sorted(best.items(), key=lambda kv: kv[0])
        )
        + ".",
    ]
    return "\n".join(lines) + "\n"


def write_block(doc: Path, task: str, text: str) -> None:
    """Replace the task's marked block of the page (appending the block if it has none)."""
    begin, end = BEGIN.format(task=task), END.format(task=task)
    page = doc.read_text() if doc.exists() else ""
    block = f"{begin}\n{text}{end}"
    if begin in page and end in page:
        head, rest = page.split(begin, 1)
        page = head + block + rest.split(end, 1)[1]
    else:
        page = page.rstrip("\n") + ("\n\n" if page else "") + block + "\n"
    doc.write_text(page)


def select(arms: tuple[Arm, ...], wanted: str | None) -> list[Arm]:
    """The arms named by a comma-separated list: a text that is some arm's whole label picks
    that arm only ("grpo b=0"), any other text every arm whose label contains it ("gvpo")."""
    if not wanted:
        return list(arms)
    texts = [w.strip() for w in wanted.split(",") if w.strip()]
    labels = {a.label for a in arms}
    return [a for a in arms if any(a.label == w if w in labels else w in a.label for w in texts)]


# --- the command ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="arithmetic", choices=["arithmetic", "copy", "reverse"])
    ap.add_argument("--full", action="store_true", help="the wider grid (about 4 hours on 2 cores)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    ap.add_argument("--steps", type=int, help="override the task's steps (a quick look)")
    ap.add_argument(
        "--arms", help="comma-separated: arms whose label is or contains one of these texts"
    )
    ap.add_argument("--lrs", help="comma-separated learning rates instead of each arm's grid")
    ap.add_argument("--doc", type=Path, default=DOC, help="the page whose block is replaced")
    ap.add_argument("--img", type=Path, default=IMG)
    ap.add_argument("--out", type=Path, default=CACHE / "algorithms")
    ap.add_argument(
        "--merge",
        action="store_true",
        help="keep the saved results of the arms not run this time (rerun a part of the grid)",
    )
    ap.add_argument(
        "--report",
        action="store_true",
        help="run nothing: rewrite the docs block and plots from the task's saved results",
    )
    args = ap.parse_args(argv)
    if args.report:
        record = json.loads((args.out / f"{args.task}.json").read_text())
        publish(record, study_from(record["study"]), args.doc, args.img)
        return

    study = study_for(args.task, args.full, args.seeds)
    if args.steps:
        study = replace(study, steps=args.steps, eval_every=max(1, args.steps // 4))
    arms = select(study.arms, args.arms)
    if args.lrs:
        arms = [replace(a, lrs=tuple(float(x) for x in args.lrs.split(","))) for a in arms]
    study = replace(study, arms=tuple(arms))
    if not arms:
        ap.error(f"no arm's label contains {args.arms!r}")

    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    start = str(starting_model(study.task, study.warm_seed, args.out))
    jobs = [Job(study, a, lr, s, start) for a in arms for lr in a.lrs for s in study.seeds]
    print(f"{len(jobs)} runs ({len(arms)} arms, seeds {list(study.seeds)}), {args.jobs} at a time")
    began = time.monotonic()
    results = []
    with multiprocessing.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:
        for i, r in enumerate(pool.imap_unordered(_work, jobs), 1):
            results.append(r)
            what = r.get("error") or f"pass@1 {r['evals'][-1]['pass@1']:.3f}"
            label = f"{r['arm']['label']} lr {r['lr']:g} seed {r['seed']}"
            elapsed = time.monotonic() - began
            print(f"[{i}/{len(jobs)} {elapsed:5.0f} s] {label}: {what}", flush=True)
    given = sys.argv[1:] if argv is None else argv
    record = {
        "study": asdict(study),
        "made_by": [
            [shlex.join(["python", "bench/algorithms.py", *given]), time.monotonic() - began]
        ],
        "jobs": args.jobs,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    # this run alone first: what a failure below would otherwise lose
    (args.out / f"{study.task}.last-run.json").write_text(json.dumps(record) + "\n")
    saved = args.out / f"{study.task}.json"
    if args.merge and saved.exists():
        record, study = merged(json.loads(saved.read_text()), record)
    (args.out / f"{study.task}.json").write_text(json.dumps(record) + "\n")
    print(publish(record, study, args.doc, args.img))


def merged(old: dict, new: dict) -> tuple[dict, Study]:
    """The saved results with this run's arms replaced by what they gave now (each run is
    deterministic for its arm, learning rate and seed, so this equals one run of both)."""
    rerun = {Arm(**{**a, "lrs": ()}).label for a in new["study"]["arms"]}
    kept = [r for r in old["results"] if r["arm"]["label"] not in rerun]
    arms = [a for a in old["study"]["arms"] if Arm(**{**a, "lrs": ()}).label not in rerun]
    study = {**old["study"], "arms": [*arms, *new["study"]["arms"]]}
    record = {
        "study": study,
        "made_by": old["made_by"] + new["made_by"],
        "jobs": new["jobs"],
        "results": kept + new["results"],
    }
    return record, study_from(study)


def study_from(saved: dict) -> Study:
    arms = tuple(Arm(**{**a, "lrs": tuple(a["lrs"])}) for a in saved["arms"])
    return Study(**{**saved, "seeds": tuple(saved["seeds"]), "arms": arms})


def publish(record: dict, study: Study, doc: Path, img: Path) -> str:
    """The plots, and the task's block of the page; returns the block's text."""
    plot(record["results"], study, img)
    text = report(record["results"], study, record["made_by"], record["jobs"])
    write_block(doc, study.task, text)
    return text


if __name__ == "__main__":
    main()
