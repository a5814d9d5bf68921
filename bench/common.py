"""What the benchmarks share: each side runs in a fresh subprocess with the same thread count
and prints one JSON line; the parent prints a markdown table."""

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
