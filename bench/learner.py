"""Benchmark: our GVPO learner update vs TRL 1.16 GRPOTrainer's update, same model, same batch.

`make bench` installs TRL into its own venv (.venv-bench, so .venv stays free of it) and runs
this with one thread. By hand, from the repository root:

    .venv-bench/bin/python bench/learner.py [--threads 1] [--sizes tiny,50m] [--iters 5]
    .venv-bench/bin/python bench/learner.py --device cuda --dtype bfloat16   # adds MFU

What is compared: one optimizer update on identical synthetic rollouts (P prompts x k completions,
fixed prompt/completion lengths, random char-vocab token ids, rewards uniform in [0, 1]); no
generation on either side. Both sides load the same saved weights in a fresh subprocess each
(so peak memory is per side) and run with the same thread count.

- ours: `Learner.learn(batch, step)` with algorithm gvpo, reference "sampling", mini_batches 1:
  one policy forward+backward over the P*k sequences (pi_ref = that same forward, detached),
  grad clip 1.0, fused AdamW step, plus the learner's diagnostics.
- trl:  GRPOTrainer's own `training_step(model, inputs)` (model.train, compute_loss_context_manager,
  `compute_loss` = `_compute_loss`, accelerator.backward) followed by what Trainer's loop does
  per optimizer step (`_clip_grad_norm`, optimizer.step, lr_scheduler.step, model.zero_grad).
  Only `_prepare_inputs` is replaced: it returns the dict `_generate_and_score_completions`
  would have produced (prompt_ids/mask, completion_ids/mask, group-normalised advantages,
  num_items_in_batch). With TRL defaults (num_iterations=1, beta=0.0, steps_per_generation =
  gradient_accumulation_steps = 1) TRL does no old-logprob and no ref-model forward, so both
  sides do exactly one policy forward+backward per update. TRL keeps its defaults otherwise
  (loss_type "dapo", fused LM head over completion positions only, optim adamw_torch_fused).
"""

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (make_tiny_model kwargs, rollout shape P, k, prompt_len, completion_len)
SIZES = {
    "tiny": (
        dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256),
        (8, 8, 16, 64),
    ),
    "50m": (
        dict(hidden_size=640, num_layers=10, num_heads=10, intermediate_size=1728),
        (4, 8, 32, 64),
    ),
    # GPU sizes (head_dim 128, as in production models; the char vocabulary keeps the LM head tiny)
    "300m": (
        dict(hidden_size=1024, num_layers=24, num_heads=8, intermediate_size=2816),
        (8, 8, 128, 384),
    ),
    "1b": (
        dict(hidden_size=2048, num_layers=16, num_heads=16, intermediate_size=5632),
        (4, 8, 128, 384),
    ),
}
LR, GRAD_CLIP, BETA = 1e-6, 1.0, 0.1


def proc_mb(key: str) -> float:
    """VmRSS / VmHWM of this process in MB (peak RSS covers torch's allocator; tracemalloc
    does not)."""
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def reset_peak(device: str) -> float:
    """Restart peak tracking; return the baseline memory in MB."""
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    return proc_mb("VmRSS")


def peak_mb(device: str) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else proc_mb("VmHWM")


def rollouts(P: int, k: int, prompt_len: int, comp_len: int, seed: int = 0):
    """Identical synthetic groups for both sides: ids avoid pad/bos/eos/unk (0-3)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(4, 101, (P, prompt_len), generator=g)
    completions = torch.randint(4, 101, (P, k, comp_len), generator=g)
    rewards = torch.rand(P, k, generator=g)
    return prompts, completions, rewards


def ours_step(model, path: str, data, args):
    import torch

    from service.contract.spec import RunSpec
    from workers.learner.learner import GroupBatch, Learner, LearnerConfig

    prompts, completions, rewards = data
    spec = RunSpec.model_validate(
        {
            "model": {"path": path},
            "dataset": {"train_file": "unused.jsonl"},
            "reward": {"type": "builtin", "name": "char_accuracy"},
            "algorithm": {
                "name": "gvpo",
                "beta": BETA,
                "group_size": completions.shape[1],
                "reference": "sampling",
            },
            "optimizer": {"lr": LR, "grad_clip": GRAD_CLIP},
            "training": {"mini_batches": 1},  # micro-batching left at its default: the whole batch
        }
    )
    model.train()
    learner = Learner(model, LearnerConfig.of(spec), torch.device(args.device), pad_id=0)
    batch = GroupBatch(prompts.tolist(), completions.tolist(), rewards)
    counter = iter(range(1, 10**9))
    return lambda: learner.learn(batch, next(counter))


def trl_step(model, path: str, data, args):
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    prompts, completions, rewards = data
    P, k, L = completions.shape
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"),
        report_to="none",
        save_strategy="no",
        per_device_train_batch_size=P * k,
        num_generations=k,
        max_completion_length=L,
        beta=0.0,
        learning_rate=LR,
        max_grad_norm=GRAD_CLIP,
        use_vllm=False,
        gradient_checkpointing=False,
        bf16=args.dtype == "bfloat16",
        use_cpu=args.device == "cpu",
        lr_scheduler_type="constant",
        seed=0,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **_: [0.0] * len(completions),
        args=config,
        train_dataset=Dataset.from_dict({"prompt": ["unused"] * P}),
        processing_class=AutoTokenizer.from_pretrained(path),
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
    trainer.current_gradient_accumulation_steps = 1  # normally set by Trainer's training loop
    dev = trainer.accelerator.device
    r = rewards.float()  # scale_rewards="group": (R - mean) / (std + 1e-4), std unbiased
    advantages = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).flatten()
    completion_ids = completions.reshape(P * k, L)
    inputs = {
        "prompt_ids": prompts.repeat_interleave(k, dim=0).to(dev),
        "prompt_mask": torch.ones(P * k, prompts.shape[1], dtype=torch.long, device=dev),
        "completion_ids": completion_ids.to(dev),
        "completion_mask": torch.ones_like(completion_ids, device=dev),
        "advantages": advantages.to(dev),
        "num_items_in_batch": torch.tensor(P * k * L, device=dev),
    }
    trainer._prepare_inputs = lambda _batch: inputs  # the batch is already generated and scored

    def step():
        trainer.training_step(trainer.model, inputs, None)
        trainer._clip_grad_norm(trainer.model)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.model.zero_grad()

    return step


def worker(args) -> dict:
    """One side, one size, in this (fresh) process; returns the measurements."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.side == "trl":
        import datasets  # noqa: F401,E401  (before the memory baseline)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).to(args.device)
    params = sum(p.numel() for p in model.parameters())
    P, k, prompt_len, comp_len = SIZES[args.size][1]
    data = rollouts(P, k, prompt_len, comp_len)
    base = reset_peak(args.device)  # the loaded model; Δ = optimizer state + grads + activations
    step = (ours_step if args.side == "ours" else trl_step)(model, args.model_dir, data, args)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    peak = peak_mb(args.device)
    if args.profile:
        profile(step, sync, args)
    return {
        "params": params,
        "tokens": P * k * (prompt_len + comp_len),
        "times": times,
        "peak_mb": peak,
        "delta_mb": peak - base,
    }


def profile(step, sync, args) -> None:
    """One profiled update: top ops by self CPU time, to stderr."""
    import torch
    from torch.profiler import ProfilerActivity

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        step()
        sync()
    sort = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    print(
        f"--- {args.side} / {args.size}\n" + prof.key_averages().table(sort_by=sort, row_limit=15),
        file=sys.stderr,
    )


def run_side(args, side: str, size: str, model_dir: str) -> dict:
    return common.run_side(
        __file__,
        side,
        size,
        model_dir,
        args.threads,
        [
            "--iters",
            str(args.iters),
            "--warmup",
            str(args.warmup),
            "--device",
            args.device,
            "--dtype",
            args.dtype,
            *(["--profile"] if args.profile else []),
        ],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sizes", default="tiny,50m", help=f"any of {','.join(SIZES)}")
    ap.add_argument("--sides", default="ours,trl", help="ours alone where TRL is not installed")
    ap.add_argument("--iters", type=int, default=5, help="timed updates per side (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="for MFU (H100 bf16 dense)")
    ap.add_argument("--profile", action="store_true", help="also profile one update per side")
    args = common.parse_or_work(ap, ["ours", "trl"], worker)

    import torch
    from transformers.utils import logging as hf_logging

    from workers.tiny_model import make_tiny_model

    hf_logging.disable_progress_bar()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(
            "--device cuda: this torch build sees no GPU (install the CUDA wheel: make install-gpu)"
        )
    mfu = args.device == "cuda"
    head = [
        "model",
        "params",
        "P x k x (prompt+compl)",
        "side",
        "step s (median)",
        "tokens/s",
        "peak MB",
        "Δ peak MB",
        "ours/trl time",
    ] + (["MFU"] if mfu else [])
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-learner-") as tmp:
        for size in args.sizes.split(","):
            shape_kwargs, (P, k, lp, lc) = SIZES[size]
            model_dir = str(
                make_tiny_model(
                    Path(tmp) / size, max_positions=max(256, lp + lc), seed=0, **shape_kwargs
                )
            )
            res = {side: run_side(args, side, size, model_dir) for side in args.sides.split(",")}
            med = {side: statistics.median(r["times"]) for side, r in res.items()}
            for side, r in res.items():
                row = [
                    size,
                    f"{r['params'] / 1e6:.2f}M",
                    f"{P}x{k}x({lp}+{lc})",
                    side,
                    f"{med[side]:.3f}",
                    f"{r['tokens'] / med[side]:,.0f}",
                    f"{r['peak_mb']:.0f}",
                    f"{r['delta_mb']:.0f}",
                    f"{med['ours'] / med['trl']:.2f}" if side == "ours" and "trl" in med else "",
                ]
                if mfu:
                    flops = 6 * r["params"] * r["tokens"] / med[side]
                    row.append(f"{flops / (args.peak_tflops * 1e12):.1%}")
                rows.append(row)
    mem = "GPU max_memory_allocated" if args.device == "cuda" else "process peak RSS (VmHWM)"
    common.print_table(
        f"{args.device} {args.dtype}, {args.threads} thread(s), warm-up "
        f"{args.warmup}, median of {args.iters}; peak = {mem}, Δ = peak minus "
        "memory with the model loaded",
        head,
        rows,
    )


if __name__ == "__main__":
    main()
