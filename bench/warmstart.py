"""Warm-started tiny models: supervised-train the offline tiny Llama on a synthetic task until it
is partly competent, as RLVR's starting checkpoints are, and cache the result.

RL from a random-init model mostly measures how fast an algorithm escapes all-zero reward
groups; RL from a model that already solves 10-40% of held-out prompts measures what the
algorithms are for. This writes such a model once per (task, seed, size, generator parameters,
training settings, CODE_VERSION) and returns the cached folder on later calls:

    python bench/warmstart.py --task arithmetic --seed 0 [--size small] [--out DIR] [--threads 1]

The folder is a complete Hugging Face model directory (AutoModelForCausalLM / AutoTokenizer,
usable as a run's model.path) holding also train.jsonl and eval.jsonl (disjoint prompts, reward
exact_match) and warmstart.json: what was trained, for how long, and the pass@1 it reached.

Training: next-token cross-entropy on the answer and the EOS after it (not the prompt), AdamW,
seeded, on CPU with a fixed thread count. Every `check_every` steps the sampled pass@1
(temperature 1, as the service samples) on a slice of the eval set is measured; training stops
at the first check at or above the target (0.2, inside the 0.1-0.4 band), or at the step cap.
The final numbers are measured on the whole eval set with the service's own rollout
(workers/rollout/hf.py) and reward code.
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.tasks import REWARD, Task, get_task, write_jsonl  # noqa: E402
from service.contract.rewards import BUILTIN_REWARDS as REWARD_PARAMS  # noqa: E402
from service.contract.spec import SamplingSpec  # noqa: E402
from workers.evaluation import pass_at_k  # noqa: E402
from workers.rewards.builtin import get_reward  # noqa: E402
from workers.rollout.hf import HFRolloutEngine  # noqa: E402
from workers.rollout.text import CompletionBuilder, eos_token_ids  # noqa: E402
from workers.tiny_model import build_model, build_tokenizer  # noqa: E402

# Bump when training or measuring changes what a cached folder would hold.
CODE_VERSION = 1
DEFAULT_CACHE = ROOT / "bench" / ".cache" / "warm"
MAX_POSITIONS = 64  # the tasks' prompt + answer + EOS stay far below this

# make_tiny_model's shape per size; head_dim = hidden_size / num_heads stays >= 32 (vLLM).
SIZES: dict[str, dict] = {
    "test": dict(hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128),
    "small": dict(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512),
    "medium": dict(hidden_size=256, num_layers=4, num_heads=8, intermediate_size=1024),
}


@dataclass(frozen=True)
class SFTConfig:
    lr: float = 2e-3
    batch_size: int = 64
    max_steps: int = 3000
    check_every: int = 25
    check_prompts: int = 128  # eval prompts per in-training check
    check_samples: int = 4  # samples per prompt at each check
    # Stop at the first check at or above `target`, aimed inside `band` with a margin for the
    # check's sampling noise; the record says whether the final measurement is in the band.
    target: float = 0.20
    band: tuple[float, float] = (0.10, 0.40)
    final_samples: int = 8  # samples per eval prompt for the recorded pass@1 / pass@k


def cache_key(task: Task, seed: int, size: str, sft: SFTConfig) -> str:
    key = {
        "code": CODE_VERSION,
        **task.key(),
        "seed": seed,
        "model": SIZES[size],
        "sft": asdict(sft),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def _score(completion: str, answer: str) -> float:
    return get_reward(REWARD).fn(completion, answer, REWARD_PARAMS[REWARD]())


def mean_pass_at_k(counts: list[int], n: int, k: int) -> float:
    """Mean over prompts of the unbiased pass@k (Chen et al. 2021), c of n passing per prompt."""
    return sum(pass_at_k(n, c, k) for c in counts) / len(counts)


def pass_counts(model, tokenizer, rows: list[dict], n: int, max_new_tokens: int) -> list[int]:
    """How many of n completions per row, sampled at temperature 1 with the service's rollout
    code (no top-k, cut at EOS), exact_match scores 1."""
    engine = HFRolloutEngine(model, tokenizer, torch.device("cpu"))
    sampling = SamplingSpec(temperature=1.0, max_new_tokens=max_new_tokens)
    rollouts = engine.generate([r["prompt"] for r in rows], n, sampling)
    return [
        sum(_score(c.text, row["answer"]) >= 1.0 for c in rollout.completions)
        for row, rollout in zip(rows, rollouts, strict=True)
    ]


def evaluate_pass_at_k(
    model, tokenizer, rows: list[dict], n: int, ks: tuple[int, ...], max_new_tokens: int
) -> dict[str, float]:
    """{"pass@1": ..., "pass@<k>": ...} from n samples per held-out row at temperature 1."""
    counts = pass_counts(model, tokenizer, rows, n, max_new_tokens)
    return {f"pass@{k}": mean_pass_at_k(counts, n, k) for k in ks}


@torch.no_grad()
def greedy_pass_at_1(model, tokenizer, rows: list[dict], max_new_tokens: int) -> float:
    tokenizer.padding_side = "left"
    eos = eos_token_ids(model.generation_config.eos_token_id, tokenizer)
    builder = CompletionBuilder(tokenizer, eos)
    sampling = SamplingSpec(max_new_tokens=max_new_tokens)
    enc = tokenizer([r["prompt"] for r in rows], return_tensors="pt", padding=True)
    model.eval()
    out = model.generate(
        **enc,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos,
    )
    new = out[:, enc["input_ids"].shape[1] :].tolist()
    texts = [builder.build(ids, sampling).text for ids in new]
    return sum(_score(t, r["answer"]) for t, r in zip(texts, rows, strict=True)) / len(rows)


def _batch(tokenizer, rows: list[dict]) -> dict[str, torch.Tensor]:
    """Right-padded prompt+answer+EOS; labels only on the answer and EOS."""
    seqs, labels, eos = [], [], [tokenizer.eos_token_id]
    for r in rows:
        p = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        a = tokenizer(r["answer"], add_special_tokens=False)["input_ids"] + eos
        seqs.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in seqs]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]),
        "labels": torch.tensor([la + [-100] * (width - len(la)) for la in labels]),
    }


def _check(model, tokenizer, rows: list[dict], task: Task, sft: SFTConfig) -> float:
    # Sampling draws from its own RNG stream so checks do not shift the training batches.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        counts = pass_counts(model, tokenizer, rows, sft.check_samples, task.max_new_tokens)
    model.train()
    return mean_pass_at_k(counts, sft.check_samples, 1)


def train(task: Task, seed: int, size: str, sft: SFTConfig, out: Path) -> dict:
    """SFT a fresh tiny model into `out` (model, tokenizer, train/eval JSONL); return the record."""
    started = time.monotonic()
    train_rows, eval_rows = task.split(seed)
    tokenizer = build_tokenizer(MAX_POSITIONS)
    model = build_model(tokenizer, max_positions=MAX_POSITIONS, seed=seed, **SIZES[size])
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=sft.lr, weight_decay=0.0)
    check_rows = eval_rows[: sft.check_prompts]
    checks: list[list[float]] = []
    stopped, step = "step_cap", 0
    model.train()
    while step < sft.max_steps:
        idx = torch.randint(len(train_rows), (sft.batch_size,), generator=gen).tolist()
        loss = model(**_batch(tokenizer, [train_rows[i] for i in idx])).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % sft.check_every == 0 or step == sft.max_steps:
            rate = _check(model, tokenizer, check_rows, task, sft)
            checks.append([step, round(loss.item(), 4), rate])
            if rate >= sft.target:
                stopped = "target"
                break
    trained_s = time.monotonic() - started
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sampled = evaluate_pass_at_k(
            model, tokenizer, eval_rows, sft.final_samples, (1, sft.final_samples),
            task.max_new_tokens,
        )  # fmt: skip
    greedy = greedy_pass_at_1(model, tokenizer, eval_rows, task.max_new_tokens)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_jsonl(out / "train.jsonl", train_rows)
    write_jsonl(out / "eval.jsonl", eval_rows)
    return {
        **task.key(),
        "seed": seed,
        "size": size,
        "model": SIZES[size],
        "parameters": sum(p.numel() for p in model.parameters()),
        "code_version": CODE_VERSION,
        "reward": REWARD,
        "max_new_tokens": task.max_new_tokens,
        "sft": asdict(sft),
        "steps": step,
        "stopped": stopped,
        "checks": checks,  # [step, last batch loss, sampled pass@1 on the check slice]
        "eval": {
            "rows": len(eval_rows),
            "samples_per_prompt": sft.final_samples,
            "temperature": 1.0,
            **sampled,
            "greedy_pass@1": greedy,
        },
        "in_band": sft.band[0] <= sampled["pass@1"] <= sft.band[1],
        "train_seconds": round(trained_s, 1),
        "seconds": round(time.monotonic() - started, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def warmstart(
    task: str = "arithmetic",
    seed: int = 0,
    size: str = "small",
    cache_dir: str | Path | None = None,
    sft: SFTConfig | None = None,
    **task_params,
) -> Path:
    """The cached warm-started model folder for these settings, training it on a miss."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    the_task = get_task(task, **task_params)
    sft = sft or SFTConfig()
    root = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    folder = root / f"{task}-seed{seed}-{size}-{cache_key(the_task, seed, size, sft)}"
    if (folder / "warmstart.json").exists():
        return folder
    # Built beside its final name and renamed in one step: a crash or a concurrent caller never
    # sees a half-written folder under the cached name.
    tmp = root / f".{folder.name}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        record = train(the_task, seed, size, sft, tmp)
        (tmp / "warmstart.json").write_text(json.dumps(record, indent=2) + "\n")
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / "warmstart.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="arithmetic", choices=["arithmetic", "reverse"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", default="small", choices=sorted(SIZES))
    ap.add_argument("--out", type=Path, default=None, help=f"cache directory ({DEFAULT_CACHE})")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=SFTConfig.max_steps)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder = warmstart(
        args.task, args.seed, args.size, args.out, SFTConfig(max_steps=args.max_steps)
    )
    record = json.loads((folder / "warmstart.json").read_text())
    ev = record["eval"]
    k = ev["samples_per_prompt"]
    print(folder)
    print(
        f"{record['task']} seed {record['seed']} ({record['parameters']:,} parameters): "
        f"{record['steps']} steps ({record['stopped']}), {record['seconds']} s on "
        f"{record['threads']} thread(s); held-out pass@1 {ev['pass@1']:.3f} at temperature 1 "
        f"(pass@{k} {ev[f'pass@{k}']:.3f}), "
        f"greedy {ev['greedy_pass@1']:.3f}"
    )


if __name__ == "__main__":
    main()
