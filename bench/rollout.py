"""Benchmark: generated tokens/s of our vLLM rollout engine vs our transformers one, same model.

`make bench` runs this in .venv-bench with one thread. By hand, from the repository root:

    .venv-bench/bin/python bench/rollout.py [--threads 1] [--sizes tiny,50m] [--iters 5] \
        [--warmup 1]

What is compared: `engine.generate(prompts, k, sampling)` of the two engines the worker picks
from, on the same saved random-init model (float32), the same P prompts (short random strings of
letters, 4-12 characters) and the same sampling settings (temperature 1, top_p 1, k completions
of at most max_new_tokens each, stopping at EOS).

- hf:   `HFRolloutEngine` (transformers `generate()`, left-padded batches, no KV paging; rows
        that hit EOS keep being computed until the whole batch is done; full distribution, no
        top-k, like vLLM).
- vllm: `VLLMRolloutEngine` (vLLM in-process, eager mode on CPU, 1 GiB KV cache, prefix caching).
        Its start-up (engine build, then the first generate() call, which warms vLLM up) is
        reported separately and excluded from the timed calls.

Each side runs in a fresh subprocess with the same thread count. Tokens are the ones actually
generated (len(token_ids) over all completions, EOS included), so an early stop is not counted
as work done. Reported: median seconds per generate() call after warm-up calls, the median of the
calls' tokens/s, and the vllm/hf throughput ratio.
"""

import argparse
import random
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (make_tiny_model kwargs, (P prompts, k completions each, max_new_tokens))
SIZES = {
    "tiny": (dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256), (16, 8, 64)),
    "50m": (
        dict(hidden_size=640, num_layers=10, num_heads=10, intermediate_size=1728),
        (8, 8, 128),
    ),
}
MAX_POSITIONS = 256  # > longest prompt (12) + longest completion (128)


def make_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 12))) for _ in range(n)]


def build_engine(side: str, model_dir: str, max_new_tokens: int):
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    device = torch.device("cpu")
    if side == "hf":
        from transformers import AutoModelForCausalLM

        from workers.rollout.hf import HFRolloutEngine

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        return HFRolloutEngine(model.eval(), tokenizer, device)
    from service.contract.spec import RunSpec
    from workers.rollout.vllm import VLLMRolloutEngine

    spec = RunSpec.model_validate(
        {
            "model": {"path": model_dir},
            "dataset": {"train_file": "unused"},
            "reward": {"type": "builtin", "name": "char_accuracy"},
            "sampling": {"max_new_tokens": max_new_tokens, "temperature": 1.0},
        }
    )
    return VLLMRolloutEngine(spec, device, torch.float32, tokenizer)


def worker(args) -> dict:
    """One side, one size, in this (fresh) process; returns the measurements."""
    import torch
    from transformers.utils import logging as hf_logging

    from service.contract.spec import SamplingSpec

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    P, k, L = SIZES[args.size][1]
    prompts = make_prompts(P)
    sampling = SamplingSpec(temperature=1.0, top_p=1.0, max_new_tokens=L)

    def call() -> tuple[float, int]:
        start = time.perf_counter()
        rollouts = engine.generate(prompts, k, sampling)
        elapsed = time.perf_counter() - start
        return elapsed, sum(len(c.token_ids) for r in rollouts for c in r.completions)

    start = time.perf_counter()
    engine = build_engine(args.side, args.model_dir, L)
    build_s = time.perf_counter() - start
    # vLLM's first call is several times slower than the next ones (lazy set-up): start-up.
    first_s, _ = call()
    for _ in range(args.warmup):
        call()
    calls = [call() for _ in range(args.iters)]
    return {
        "build_s": build_s,
        "first_s": first_s,
        "calls": calls,
        "threads_after": torch.get_num_threads(),
    }


def run_side(args, side: str, size: str, model_dir: str) -> dict:
    return common.run_side(
        __file__,
        side,
        size,
        model_dir,
        args.threads,
        ["--iters", str(args.iters), "--warmup", str(args.warmup)],
    )


def table_rows(size: str, shape: tuple, res: dict) -> list[list[str]]:
    P, k, L = shape
    med = {side: statistics.median(s for s, _ in r["calls"]) for side, r in res.items()}
    tps = {side: statistics.median(t / s for s, t in r["calls"]) for side, r in res.items()}
    rows = []
    for side, r in res.items():
        startup = f"{r['build_s']:.1f} + {r['first_s']:.1f}" if side == "vllm" else ""
        ratio = f"{tps['vllm'] / tps['hf']:.2f}" if side == "vllm" and "hf" in tps else ""
        tokens = statistics.median(t for _, t in r["calls"])
        rows.append(
            [
                size,
                f"{P}x{k}x{L}",
                side,
                f"{med[side]:.2f}",
                f"{tokens:.0f}",
                f"{tps[side]:,.0f}",
                startup,
                ratio,
            ]
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sizes", default="tiny,50m", help=f"any of {','.join(SIZES)}")
    ap.add_argument("--sides", default="hf,vllm")
    ap.add_argument("--iters", type=int, default=5, help="timed generate() calls (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls after the first one")
    args = common.parse_or_work(ap, ["hf", "vllm"], worker)

    from transformers.utils import logging as hf_logging

    from workers.tiny_model import make_tiny_model

    hf_logging.disable_progress_bar()
    head = [
        "model",
        "P x k x max_new",
        "side",
        "s/generate (median)",
        "tokens/call",
        "tokens/s",
        "start-up s (build + 1st call)",
        "vllm/hf tokens/s",
    ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        for size in args.sizes.split(","):
            shape_kwargs, shape = SIZES[size]
            model_dir = str(
                make_tiny_model(
                    Path(tmp) / size, max_positions=MAX_POSITIONS, seed=0, **shape_kwargs
                )
            )
            res = {side: run_side(args, side, size, model_dir) for side in args.sides.split(",")}
            rows += table_rows(size, shape, res)
            common.check_threads(res, size, args.threads)
    common.print_table(
        f"cpu float32, {args.threads} thread(s), temperature 1, top_p 1; first "
        f"call + {args.warmup} warm-up call(s) untimed, median of {args.iters}",
        head,
        rows,
    )


if __name__ == "__main__":
    main()
