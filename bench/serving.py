"""Benchmark: our OpenAI-compatible endpoint against vLLM's own OpenAI server, side by side.

`make bench-serving` runs it in .venv (both placements below). By hand, from the repository root:

    .venv/bin/python bench/serving.py [--quick] [--pin] [--threads 1] [--max-tokens 64]
        [--rounds 3] [--model HF_FOLDER] [--json PATH]

What is compared, on the same checkpoint folder, with the same requests:

- ours: the embedded stack's `POST /v1/chat/completions` with a project's API key and
  `model: "ckpt_…"`; the API authenticates, resolves the checkpoint, routes to the inference
  worker (`gvpo serve`) and relays to the vLLM server that worker started.
- vLLM: `python -m vllm.entrypoints.openai.api_server`, started by this script with our inference
  worker's own command line and options (workers/serving/vllm_server.py `VLLMServer`, options
  from workers/serving/worker.py), so dtype, KV cache, enforce-eager, prefix caching and the
  environment are the same; only the port, the key and the log folder differ.

The checkpoint is real: a one-step run of the copy task on --model (default: a fresh offline
tiny model, as `gvpo make-tiny-model` makes), trained by the stack's worker; both sides serve
its only checkpoint.

The load: the official `openai` SDK (AsyncOpenAI, a new client for each round, no retries),
chat requests over fixed prompts, temperature 1, max_tokens tokens with `ignore_eos` and
`skip_special_tokens: false` (vLLM's extra parameters, through extra_body), so that every answer
has exactly max_tokens tokens (checked from each answer's usage) and each token is text. Four
scenarios: non-streaming ("whole") and streaming, each at 1 and 32 clients; each client sends
its next request when its answer has ended (closed loop). For each scenario the sides take
turns, A B then B A, for --rounds rounds, each side after a warm-up of its own and each round
after SETTLE_S of quiet; totals are summed over the rounds.

Reported per scenario and side: output tokens/s (tokens over the measured seconds), requests/s,
latency p50 and p99 (request sent to answer complete), time to first token (the first chunk
with content) for streaming, ours/vLLM of tokens/s with the range of the per-round ratios; and
the CPU time per request of each side's processes by role (API, vLLM's API server, vLLM's
engine: EngineCore and Worker, other; client: this process), from /proc. Markdown tables are
printed and all results (each round's, the settings, the machine) written as JSON.

Threads: every process gets OMP_NUM_THREADS=MKL_NUM_THREADS=--threads and
VLLM_CPU_OMP_THREADS_BIND=0..threads-1 (vLLM's CPU Worker binds its OpenMP threads to those
cores and takes their number as its torch threads; "auto" would choose cores itself); the
binding each vLLM server reports in its log is printed. vLLM's EngineCore is not bound. With
--pin, both sides' EngineCore and Worker processes are bound to those cores and every other
process (API, vLLM's API servers, the clients) to the remaining ones, as on a GPU machine where
the engine does not compete with the request path for CPU.

Both vLLM servers run for the whole benchmark, the idle one beside the one under load; on our
side the API process and the idle training worker share the machine too. The stack's inference
worker is asked to unload the model at the end (see `unload`).
"""

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import re
import secrets
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import common
import procs

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "client")]

SIDES = ("ours", "vllm")
SIDE_NAMES = {"ours": "ours (API)", "vllm": "vLLM server"}
LOAD_TIMEOUT_S = 300.0  # the first request loads the model on the inference worker
LETTERS = "abcdefghij"
# Quiet before each round: vLLM's engine processes busy-poll for 1 s after their last step
# (shm_broadcast's SpinCondition), and both sides' model workers are bound to the same cores.
SETTLE_S = 2.0
ROLES = ("api", "vllm_api_server", "vllm_engine", "other", "client")


@dataclasses.dataclass(frozen=True)
class Scenario:
    stream: bool
    clients: int
    requests: int  # per side and round

    @property
    def name(self) -> str:
        return f"{'stream' if self.stream else 'whole'}-{self.clients}"


@dataclasses.dataclass
class Sample:
    latency: float
    ttft: float | None
    tokens: int
    error: str | None = None


def scenarios(quick: bool) -> list[Scenario]:
    one, many = (4, 64) if quick else (16, 160)
    return [
        Scenario(stream, clients, one if clients == 1 else many)
        for stream in (False, True)
        for clients in (1, 32)
    ]


def prompts(n: int = 64) -> list[str]:
    """Fixed prompts of the copy task's shape, a little longer: `copy abcdefgh=`."""
    import random

    rng = random.Random(0)
    return [f"copy {''.join(rng.choice(LETTERS) for _ in range(8))}=" for _ in range(n)]


def thread_env(threads: int) -> dict[str, str]:
    cores = "0" if threads == 1 else f"0-{threads - 1}"
    return {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "VLLM_CPU_OMP_THREADS_BIND": cores,
        "TOKENIZERS_PARALLELISM": "false",
    }


# --- the checkpoint and the two servers ----------------------------------------------------------


def make_checkpoint(stack, key: str, model: Path, work: Path) -> tuple[str, str]:
    """A one-step run of the copy task on `model`, trained by the stack's worker; returns its
    checkpoint's (id, folder)."""
    from gvpo_client import Client
    from service.db import session_scope
    from service.demo import write_dataset
    from service.models import Checkpoint

    spec = {
        "name": "bench-serving",
        "model": {"path": str(model)},
        "algorithm": {"group_size": 4},
        "sampling": {"max_new_tokens": 5},
        "rollout": {"engine": "hf"},  # no vLLM engine in the training worker
        "training": {"steps": 1, "prompts_per_step": 2, "mini_batches": 1},
        "reward": {"type": "builtin", "name": "char_accuracy"},
        "checkpoint": {"every_steps": 1},
    }
    with Client(stack.url, key) as client:
        spec["dataset"] = {
            "train_file": client.upload_file(write_dataset(work / "copy.jsonl"))["id"]
        }
        run = client.wait(client.create_run(spec)["id"], timeout=300, poll_s=0.5)
        if run["status"] != "succeeded":
            sys.exit(f"the run that makes the checkpoint {run['status']}: {run.get('error')}")
        ckpt = client.checkpoints(run["id"])[-1]["id"]
    with session_scope(stack.settings.resolved_database_url) as session:
        return ckpt, session.get(Checkpoint, ckpt).path


def wait_served(url: str, key: str, model: str) -> float:
    """Send one short request until it is answered (the inference worker registers, then loads
    the model); returns the seconds that took."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)
    started, deadline = time.monotonic(), time.monotonic() + LOAD_TIMEOUT_S
    while True:
        try:
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=1
            )
            return time.monotonic() - started
        except (openai.APIStatusError, openai.APIConnectionError) as exc:
            if getattr(exc, "status_code", 503) != 503 or time.monotonic() > deadline:
                raise
            time.sleep(1)


def start_peer(settings, name: str, folder: str, log_dir: Path):
    """vLLM's own server on the folder, as our inference worker would start it."""
    from workers.serving.vllm_server import VLLMServer
    from workers.serving.worker import _device_options, _gpu_bytes

    if _gpu_bytes() is not None:  # ours already holds its share of the GPU
        sys.exit("bench/serving.py runs on CPU machines: both servers would claim the same GPU")
    options = dataclasses.replace(
        _device_options(settings, secrets.token_hex(16), None), log_dir=log_dir
    )
    server = VLLMServer(name, Path(folder), options, need=0)  # need: a GPU's share; none here
    started = time.monotonic()
    server.start(LOAD_TIMEOUT_S)
    return server, time.monotonic() - started


def binding(log: Path) -> str:
    """The OpenMP binding a vLLM server's log reports ("core ids=[0]")."""
    try:
        found = re.findall(r"core ids=\[[^\]]*\]", log.read_text(errors="replace"))
    except OSError:
        return "(no log)"
    return found[-1] if found else "(not in the log)"


# --- processes ----------------------------------------------------------------------------------


def role(pid: int) -> str:
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "other"
    if comm.startswith("VLLM::"):  # EngineCore (scheduler) and Worker (the model)
        return "vllm_engine"
    if "vllm.entrypoints.openai.api_server" in cmdline:
        return "vllm_api_server"
    return "api" if "service.stack" in cmdline else "other"


def pin(targets: dict, engine_cores: set[int]) -> None:
    """--pin: each side's engine processes (vLLM's EngineCore and Worker) on `engine_cores`,
    everything else of both sides (API, vLLM API servers, inference worker) and this process
    (the clients) on the other cores."""
    rest = set(range(os.cpu_count() or 1)) - engine_cores
    if not rest:
        sys.exit(f"--pin needs more cores than the engine's {len(engine_cores)}")
    for t in targets.values():
        for pid in t["pids"]:
            procs.bind(pid, engine_cores if t["roles"][pid] == "vllm_engine" else rest)
    procs.bind(os.getpid(), rest)


# --- the load ------------------------------------------------------------------------------------


async def one_request(client, model: str, prompt: str, stream: bool, max_tokens: int) -> Sample:
    import openai

    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 1.0,
        # every answer max_tokens long; special tokens as text, so every token is content
        "extra_body": {"ignore_eos": True, "skip_special_tokens": False},
    }
    start, first, tokens = time.perf_counter(), None, 0
    try:
        if not stream:
            answer = await client.chat.completions.create(**body)
            tokens = answer.usage.completion_tokens
        else:
            events = await client.chat.completions.create(
                **body, stream=True, stream_options={"include_usage": True}
            )
            async for chunk in events:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - start
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
    except openai.APIError as exc:
        return Sample(time.perf_counter() - start, None, 0, f"{type(exc).__name__}: {exc}"[:300])
    return Sample(time.perf_counter() - start, first, tokens)


async def closed_loop(
    client, model: str, texts: list[str], sc: Scenario, n: int, max_tokens: int
) -> tuple[list[Sample], float]:
    """n requests from sc.clients clients, each sending its next when its answer ends."""
    numbers, samples = iter(range(n)), []

    async def one_client() -> None:
        for i in numbers:
            samples.append(
                await one_request(client, model, texts[i % len(texts)], sc.stream, max_tokens)
            )

    start = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(sc.clients)))
    return samples, time.perf_counter() - start


async def measured(target: dict, texts: list[str], sc: Scenario, n: int, max_tokens: int) -> dict:
    """One side's round of n requests, after SETTLE_S of quiet, from a new SDK client (its
    connections are opened in the round): its samples, seconds, and the CPU seconds used."""
    import openai

    await asyncio.sleep(SETTLE_S)
    async with openai.AsyncOpenAI(
        base_url=target["url"] + "/v1", api_key=target["key"], max_retries=0, timeout=300
    ) as client:
        before, client_before = procs.cpu_seconds(target["pids"]), os.times()
        samples, wall = await closed_loop(client, target["model"], texts, sc, n, max_tokens)
        after, client_after = procs.cpu_seconds(target["pids"]), os.times()
    cpu = dict.fromkeys(ROLES, 0.0)
    for pid, used in after.items():
        cpu[target["roles"][pid]] += used - before[pid]
    cpu["client"] = sum(client_after[:2]) - sum(client_before[:2])
    return {"wall_s": wall, "cpu_s": cpu, "samples": [dataclasses.asdict(s) for s in samples]}


async def run_all(targets: dict, args, plan: list[Scenario]) -> dict:
    """Each scenario: a warm-up per side, then --rounds rounds, A B then B A."""
    texts, results = prompts(), {}
    for sc in plan:
        rounds = {side: [] for side in SIDES}
        for side in SIDES:  # the warm-up
            await measured(targets[side], texts, sc, max(4, sc.clients), args.max_tokens)
        for r in range(args.rounds):
            for side in SIDES if r % 2 == 0 else SIDES[::-1]:
                rounds[side].append(
                    await measured(targets[side], texts, sc, sc.requests, args.max_tokens)
                )
        results[sc.name] = {"scenario": dataclasses.asdict(sc), "rounds": rounds}
        print(f"{sc.name}: {summary_line(rounds, args.max_tokens)}", file=sys.stderr, flush=True)
    return results


# --- the report ----------------------------------------------------------------------------------


def summarise(rounds: list[dict], max_tokens: int) -> dict:
    samples = [s for r in rounds for s in r["samples"]]
    ok = [s for s in samples if s["error"] is None]
    wall = sum(r["wall_s"] for r in rounds)
    ttft = [s["ttft"] for s in ok if s["ttft"] is not None]
    return {
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "short_answers": sum(s["tokens"] != max_tokens for s in ok),
        "tokens_per_s": sum(s["tokens"] for s in ok) / wall,
        "requests_per_s": len(ok) / wall,
        "p50_ms": 1000 * statistics.median(s["latency"] for s in ok) if ok else float("nan"),
        "p99_ms": 1000 * common.percentile([s["latency"] for s in ok], 99),
        "ttft_p50_ms": 1000 * statistics.median(ttft) if ttft else None,
        "ttft_p99_ms": 1000 * common.percentile(ttft, 99) if ttft else None,
        "cpu_ms_per_request": {
            r: 1000 * sum(x["cpu_s"][r] for x in rounds) / max(1, len(samples)) for r in ROLES
        },
        "round_tokens_per_s": [
            sum(s["tokens"] for s in r["samples"] if s["error"] is None) / r["wall_s"]
            for r in rounds
        ],
    }


def ratios(rounds: dict, max_tokens: int) -> tuple[float, list[float]]:
    ours, peer = (summarise(rounds[side], max_tokens) for side in SIDES)
    each = [
        a / b for a, b in zip(ours["round_tokens_per_s"], peer["round_tokens_per_s"], strict=True)
    ]
    return ours["tokens_per_s"] / peer["tokens_per_s"], each


def summary_line(rounds: dict, max_tokens: int) -> str:
    ratio, each = ratios(rounds, max_tokens)
    rates = ", ".join(
        f"{side} {summarise(rounds[side], max_tokens)['tokens_per_s']:.0f} tok/s" for side in SIDES
    )
    return f"{rates}; ours/vLLM {ratio:.2f} (rounds {min(each):.2f}-{max(each):.2f})"


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def summarise_all(results: dict, max_tokens: int) -> None:
    """Add each scenario's summary per side, its ratio and its per-round ratios."""
    for res in results.values():
        res["summary"] = {side: summarise(res["rounds"][side], max_tokens) for side in SIDES}
        res["ratio"], res["round_ratios"] = ratios(res["rounds"], max_tokens)


def table_rows(results: dict) -> list[list[str]]:
    rows = []
    for res in results.values():
        sc, ratio, each = res["scenario"], res["ratio"], res["round_ratios"]
        for side in SIDES:
            s = res["summary"][side]
            rows.append(
                [
                    "stream" if sc["stream"] else "whole",
                    str(sc["clients"]),
                    SIDE_NAMES[side],
                    f"{s['requests']}" + (f" ({s['errors']} failed)" if s["errors"] else ""),
                    f"{s['tokens_per_s']:,.0f}",
                    f"{s['requests_per_s']:.1f}",
                    ms(s["p50_ms"]),
                    ms(s["p99_ms"]),
                    ms(s["ttft_p50_ms"]) + " / " + ms(s["ttft_p99_ms"]) if sc["stream"] else "-",
                    f"**{ratio:.2f}** ({min(each):.2f}-{max(each):.2f})" if side == "ours" else "",
                ]
            )
    return rows


def cpu_rows(results: dict) -> list[list[str]]:
    rows = []
    for res in results.values():
        sc = res["scenario"]
        for side in SIDES:
            cpu = res["summary"][side]["cpu_ms_per_request"]
            rows.append(
                [
                    "stream" if sc["stream"] else "whole",
                    str(sc["clients"]),
                    SIDE_NAMES[side],
                    *(f"{cpu[r]:.1f}" if side == "ours" or r != "api" else "-" for r in ROLES),
                    f"{sum(cpu.values()):.1f}",
                ]
            )
    return rows


def machine() -> dict:
    import openai
    import vllm

    return {
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "vllm": vllm.__version__,
        "openai": openai.__version__,
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
    }


def report(results: dict, args, info: dict, json_path: Path) -> None:
    head = [
        "mode",
        "clients",
        "side",
        "requests",
        "output tok/s",
        "req/s",
        "p50 ms",
        "p99 ms",
        "TTFT p50 / p99 ms",
        "ours/vLLM tok/s (rounds)",
    ]
    summarise_all(results, args.max_tokens)
    rows = table_rows(results)
    common.print_table(
        f"chat, {args.max_tokens} tokens per answer (ignore_eos), temperature 1; "
        f"{args.rounds} rounds per scenario, sides alternating; {info['threads']} thread(s) "
        f"{'(--pin: engine processes alone on their cores) ' if info['pinned'] else ''}"
        f"(OMP_NUM_THREADS, VLLM_CPU_OMP_THREADS_BIND={info['env']['VLLM_CPU_OMP_THREADS_BIND']}; "
        f"vLLM binding ours: {info['binding']['ours']}, vLLM: {info['binding']['vllm']}); "
        f"{info['machine']['cpus']} cores, vllm {info['machine']['vllm']}, openai "
        f"{info['machine']['openai']}; model loads: ours {info['load_s']['ours']:.0f} s, "
        f"vLLM {info['load_s']['vllm']:.0f} s; total {info['total_s']:.0f} s",
        head,
        rows,
    )
    common.print_table(
        "CPU ms per request, by process (the side's own processes; client: this process)",
        [
            "mode",
            "clients",
            "side",
            "API",
            "vLLM API server",
            "vLLM engine",
            "other",
            "client",
            "all",
        ],
        cpu_rows(results),
    )
    short = {
        f"{name}/{side}": res["summary"][side]["short_answers"]
        for name, res in results.items()
        for side in SIDES
        if res["summary"][side]["short_answers"]
    }
    if short:
        print(f"\nnote: answers without exactly {args.max_tokens} tokens: {short}")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({**info, "results": results}, indent=1))
    print(f"\nresults: {json_path}")


def measure(args, work: Path) -> tuple[dict, dict]:
    """Start the stack, make the checkpoint, start the peer, run the load; (results, info)."""
    from service.auth.service import create_api_key
    from service.config import Settings
    from service.db import session_scope
    from service.migrate import prepare
    from service.stack import Stack

    model = args.model
    if model is None:
        from workers.tiny_model import make_tiny_model

        model = make_tiny_model(work / "tiny", seed=0)
    settings = Settings(data_dir=work / "gvpo", api_port=0, grpc_port=0, torch_threads=args.threads)
    prepare(settings)
    with session_scope(settings.resolved_database_url) as session:
        _, key = create_api_key(session, "bench", settings.api_key_pepper)
    stack, peer, ckpt, load = Stack(settings, log_dir=work / "logs"), None, None, {}
    try:
        stack.start()
        ckpt, folder = make_checkpoint(stack, key, Path(model), work)
        load["ours"] = wait_served(stack.url, key, ckpt)
        peer, load["vllm"] = start_peer(stack.settings, ckpt, folder, work / "peer")
        targets = {
            "ours": target(stack.url, key, ckpt, stack.procs["api"].pid, stack.procs["serve"].pid),
            "vllm": target(peer.url, peer.options.token, ckpt, peer.proc.pid),
        }
        if args.pin:
            pin(targets, set(range(args.threads)))
        info = {
            "command": " ".join(sys.argv),
            "threads": args.threads,
            "pinned": args.pin,
            "env": thread_env(args.threads),
            "binding": {
                "ours": binding(settings.resolved_data_dir / "serving" / "logs" / f"{ckpt}.log"),
                "vllm": binding(peer.log),
            },
            "vllm_command": [a if a != peer.options.token else "***" for a in peer.command()[1:]],
            "model": str(model),
            "checkpoint": folder,
            "load_s": load,
            "machine": machine(),
        }
        print(f"serving {ckpt} from {folder}; vLLM's binding: {info['binding']}", file=sys.stderr)
        results = asyncio.run(run_all(targets, args, scenarios(args.quick)))
    finally:
        if peer is not None:
            peer.stop()
        if ckpt is not None:
            unload(stack.settings, ckpt)
        stack.stop()
    return results, info


def target(url: str, key: str, model: str, *roots: int) -> dict:
    """Where one side is, and its processes (for their CPU time)."""
    pids = [pid for root in roots for pid in procs.process_tree(root)]
    return {
        "url": url,
        "key": key,
        "model": model,
        "pids": pids,
        "roles": {p: role(p) for p in pids},
    }


def unload(settings, model: str) -> None:
    """Have the inference worker stop the model's vLLM server. Stack.stop() alone leaves that
    server running: `gvpo serve` dies of the SIGTERM before its own clean-up (uvicorn re-raises
    the signal once it has shut down, and the server runs in a session of its own)."""
    import httpx
    from sqlalchemy import select

    from service.db import session_scope
    from service.models import InferenceWorker

    with session_scope(settings.resolved_database_url) as session:
        urls = list(session.scalars(select(InferenceWorker.url)))
    for url in urls:
        try:
            httpx.delete(
                f"{url}/models/{model}",
                headers={"Authorization": f"Bearer {settings.serve_token}"},
                timeout=60,
            )
        except httpx.HTTPError as exc:
            print(f"note: could not unload {model} at {url}: {exc!r}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests and 2 rounds")
    ap.add_argument("--threads", type=int, default=1, help="OpenMP/torch threads per process")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per answer")
    ap.add_argument("--rounds", type=int, help="rounds per scenario (default 3; --quick 2)")
    ap.add_argument(
        "--pin",
        action="store_true",
        help="vLLM's engine processes on the first --threads cores, all else on the others",
    )
    ap.add_argument("--model", help="a Hugging Face model folder (default: the tiny model)")
    ap.add_argument("--json", type=Path, help="results (default bench/.cache/serving[-pin].json)")
    args = ap.parse_args()
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.json = args.json or ROOT / "bench" / ".cache" / f"serving{'-pin' if args.pin else ''}.json"
    os.environ.update(thread_env(args.threads))  # before any process starts: all inherit it
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        results, info = measure(args, Path(tmp))
    info["total_s"] = time.perf_counter() - started
    report(results, args, info, args.json)


if __name__ == "__main__":
    main()
