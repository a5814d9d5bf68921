"""Benchmark: CPU time the API process spends per relayed inference request, on the plain
passthrough path (no metadata.gvpo_episode), with a stand-in for vLLM so that nothing else on
the machine generates.

From the repository root (seconds of CPU in all):

    python bench/relay_overhead.py [--requests 200] [--concurrency 1,32] [--profile DIR]

Three processes, each started fresh:

- the upstream: an aiohttp server on loopback that plays an inference worker's control server
  (POST /models answers where the model is served: itself) and vLLM's OpenAI server (POST
  /v1/chat/completions answers a whole chat.completion, or 64 chat.completion.chunk server-sent
  events and `data: [DONE]`, each event its own HTTP chunk). Events are --gap-ms apart (auto:
  1 ms alone, 0.6 ms per concurrent client past that), so that each reaches the API as its own
  read, as vLLM's do when it decodes one token per stream per step; a whole answer comes after
  the same 64 gaps.
- the API: the product's app (create_app) under uvicorn with service.edge.SERVER and the access
  log on, as `gvpo api` runs it, on SQLite in a fresh temporary data dir, its background
  threads (reaper, notifier) and gRPC off so that only requests cost CPU. A run that published
  weights (or, with --model ckpt, one of its checkpoints) is the model; an inference_workers row
  names the upstream, heartbeat in the future so it never goes stale.
- this process: drives --requests requests per mode and concurrency with aiohttp (one session,
  keep-alive), after a warm-up of 20, and reads the API process's CPU time (user + system, all
  threads; psutil) before and after.

Reported: for each mode (whole, stream) and concurrency, the API's CPU ms per request, its
requests/s, and the upstream's CPU ms per request (what vLLM's HTTP side would spend, for
scale). OMP_NUM_THREADS=1 everywhere. With --profile DIR the API runs under cProfile (every
thread, merged) and DIR/api-c<clients>.prof is printed by own time; CPU numbers under the
profiler are not comparable with those without.
"""

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "client"), str(ROOT / "proto")]

TOKENS = 64
WARMUP = 20
MODEL_NAME = "tiny"
CHAT = {"messages": [{"role": "user", "content": "Say something."}], "max_tokens": TOKENS}


# ---------------------------------------------------------------- the upstream (vLLM's stand-in)


def _chunk(i: int, created: int) -> bytes:
    delta = {"role": "assistant", "content": ""} if i == 0 else {"content": f" tok{i}"}
    event = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": created,
        "model": MODEL_NAME,
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": "length" if i == TOKENS - 1 else None,
            }
        ],
    }
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


def _whole(created: int) -> dict:
    text = "".join(f" tok{i}" for i in range(1, TOKENS))
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": created,
        "model": MODEL_NAME,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "tool_calls": []},
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
            }
        ],
        "usage": {"prompt_tokens": 12, "total_tokens": 12 + TOKENS, "completion_tokens": TOKENS},
    }


def upstream(port_file: Path, gap_s: float) -> None:
    from aiohttp import web

    async def models(request: web.Request) -> web.Response:
        body = await request.json()
        url = f"http://127.0.0.1:{request.transport.get_extra_info('sockname')[1]}"
        return web.json_response({"url": url, "version": body["version"]})

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        created = int(time.time())
        if not body.get("stream"):
            await asyncio.sleep(TOKENS * gap_s)
            return web.json_response(_whole(created))
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for i in range(TOKENS):
            await asyncio.sleep(gap_s)
            await response.write(_chunk(i, created))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/models", models)
        app.router.add_post("/v1/chat/completions", chat)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port_file.write_text(str(runner.addresses[0][1]))
        await asyncio.Event().wait()

    asyncio.run(main())


# ---------------------------------------------------------------- the API


def _settings(data_dir: Path, port: int = 0):
    from service.config import Settings

    return Settings(
        data_dir=data_dir,
        api_port=port,
        grpc_port=0,
        reaper_interval_s=0,
        notify_interval_s=0,
    )


def api(data_dir: Path, port: int, profile: str | None) -> None:
    import uvicorn

    from service.edge import SERVER
    from service.main import create_app

    settings = _settings(data_dir, port)
    app = create_app(settings)
    if not profile:
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="info", **SERVER)
        return
    import cProfile
    import pstats
    import threading

    profilers = [cProfile.Profile()]

    def in_each_thread(*_) -> None:  # a thread's first event: its own profiler from then on
        profilers.append(cProfile.Profile())
        profilers[-1].enable()

    threading.setprofile(in_each_thread)
    profilers[0].enable()
    try:
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="info", **SERVER)
    except KeyboardInterrupt:
        pass
    finally:
        profilers[0].disable()
        pstats.Stats(*profilers).dump_stats(profile)


def prepare(data_dir: Path, upstream_port: int, kind: str) -> tuple[str, str]:
    """A migrated database with a project's key, a model of `kind` and the upstream as its
    inference worker; (key, model id)."""
    from datetime import timedelta

    from service.auth.service import create_api_key
    from service.db import session_scope
    from service.migrate import upgrade
    from service.models import Checkpoint, InferenceWorker, Run
    from service.models.base import utcnow

    settings = _settings(data_dir)
    settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    weights = data_dir / "weights"
    weights.mkdir()
    with session_scope(settings.resolved_database_url) as session:
        project, key = create_api_key(session, "bench", settings.api_key_pepper)
        run = Run(
            project_id=project.id,
            status="running",
            spec={},
            webhook_secret_encrypted="-",
            total_steps=1,
            weights_path=str(weights),
            weights_step=1,
        )
        session.add(run)
        session.flush()
        model = run.id
        if kind == "ckpt":
            ckpt = Checkpoint(id=f"ckpt_{run.id[4:]}_1", run_id=run.id, step=1, path=str(weights))
            ckpt.bytes = 1
            session.add(ckpt)
            model = ckpt.id
        later = utcnow() + timedelta(days=1)
        session.add(
            InferenceWorker(
                id="bench",
                url=f"http://127.0.0.1:{upstream_port}",
                models=[],
                memory_bytes=2**34,
                started_at=utcnow(),
                heartbeat_at=later,
            )
        )
    return key, model


# ---------------------------------------------------------------- the load


async def _drive(url: str, key: str, model: str, stream: bool, n: int, concurrency: int) -> None:
    import aiohttp

    body = json.dumps({"model": model, **CHAT, "stream": stream}).encode()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    queue = iter(range(n))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> None:
            async with session.post(url, data=body, headers=headers) as resp:
                data = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"the API answered {resp.status}: {data[:300]!r}")
            if stream:
                events = data.count(b"data: ")
                if events != TOKENS + 1 or not data.endswith(b"data: [DONE]\n\n"):
                    raise RuntimeError(f"a stream of {events} events: {data[-200:]!r}")
            elif len(json.loads(data)["choices"][0]["message"]["content"]) < TOKENS:
                raise RuntimeError(f"a short answer: {data[:300]!r}")

        async def client() -> None:
            for _ in queue:
                await one()

        await asyncio.gather(*(client() for _ in range(concurrency)))


def _cpu(proc) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def _wait_for_file(path: Path, proc: subprocess.Popen, what: str) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited ({proc.returncode})")
        time.sleep(0.05)
    raise SystemExit(f"{what} did not start")


def _wait_for_api(url: str, proc: subprocess.Popen) -> None:
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the API exited ({proc.returncode})")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit("the API did not start")


def _gap_s(arg: str, concurrency: int) -> float:
    return (max(1.0, 0.6 * concurrency) if arg == "auto" else float(arg)) / 1000


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path[:3])}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, __file__, *args], env=env, stdout=out, stderr=subprocess.STDOUT
        )


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def measure(args: argparse.Namespace, work: Path) -> list[dict]:
    import psutil

    results = []
    for concurrency in args.concurrency:
        gap = _gap_s(args.gap_ms, concurrency)
        data_dir = work / f"c{concurrency}"
        data_dir.mkdir()
        up_port_file = data_dir / "upstream.port"
        up = _start(
            ["--role", "upstream", "--dir", str(up_port_file), "--gap", str(gap)], work / "up.log"
        )
        api_proc = None
        try:
            up_port = int(_wait_for_file(up_port_file, up, "the upstream"))
            key, model = prepare(data_dir, up_port, args.model)
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            role = ["--role", "api", "--dir", str(data_dir), "--port", str(port)]
            if args.profile:
                role += ["--profile-to", str(Path(args.profile) / f"api-c{concurrency}.prof")]
            api_proc = _start(role, work / "api.log")
            base = f"http://127.0.0.1:{port}"
            _wait_for_api(base, api_proc)
            url = f"{base}/v1/chat/completions"
            api_ps, up_ps = psutil.Process(api_proc.pid), psutil.Process(up.pid)
            for stream in (False, True):
                asyncio.run(_drive(url, key, model, stream, WARMUP, min(concurrency, WARMUP)))
                api0, up0, t0 = _cpu(api_ps), _cpu(up_ps), time.perf_counter()
                asyncio.run(_drive(url, key, model, stream, args.requests, concurrency))
                wall = time.perf_counter() - t0
                api1, up1 = _cpu(api_ps), _cpu(up_ps)
                results.append(
                    {
                        "mode": "stream" if stream else "whole",
                        "concurrency": concurrency,
                        "gap_ms": round(gap * 1000, 2),
                        "api_cpu_ms": 1000 * (api1 - api0) / args.requests,
                        "upstream_cpu_ms": 1000 * (up1 - up0) / args.requests,
                        "requests_per_s": args.requests / wall,
                    }
                )
                print(json.dumps(results[-1]), file=sys.stderr)
        finally:
            if api_proc is not None:
                _stop(api_proc)
            _stop(up)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200, help="per mode and concurrency")
    ap.add_argument("--concurrency", default="1,32", help="comma-separated client counts")
    ap.add_argument("--gap-ms", default="auto", help="between streamed events (auto: see top)")
    ap.add_argument("--model", choices=["run", "ckpt"], default="ckpt", help="what is asked for")
    ap.add_argument("--profile", help="a folder: run the API under cProfile, stats kept there")
    ap.add_argument("--role", choices=["upstream", "api"], help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--gap", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--profile-to", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "upstream":
        upstream(Path(args.dir), args.gap)
        return
    if args.role == "api":
        api(Path(args.dir), args.port, args.profile_to)
        return
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gvpo-relay-") as tmp:
        results = measure(args, Path(tmp))
    head = ["mode", "clients", "event gap ms", "API CPU ms/request", "upstream CPU ms/request"]
    rows = [
        [r["mode"], str(r["concurrency"]), str(r["gap_ms"]), f"{r['api_cpu_ms']:.2f}"]
        + [f"{r['upstream_cpu_ms']:.2f}", f"{r['requests_per_s']:.1f}"]
        for r in results
    ]
    caption = f"API CPU per relayed chat completion ({args.requests} requests each, {args.model})"
    common.print_table(caption, [*head, "requests/s"], rows)
    if args.profile:
        import pstats

        for prof in sorted(Path(args.profile).glob("*.prof")):
            print(f"\n{prof}")
            pstats.Stats(str(prof)).sort_stats("tottime").print_stats(40)


if __name__ == "__main__":
    main()
