"""One model served by vLLM's own OpenAI-compatible server, in a process of its own.

The server is vLLM's (`vllm.entrypoints.openai.api_server`): its chat template handling, tool
call parsing, sampling parameters, log-probs, streaming and token ids (`return_token_ids`) are
what clients get, with nothing rewritten by us. It listens on the inference worker's address,
under the model's id as its served name, and answers only requests that carry the serve token
(settings.serve_token, checked on every route by guard.py), which the API sends; clients reach
it through the API.

A run's model follows the run: newer weights are swapped in place, with no restart, through
vLLM's dev endpoints: pause (in-flight requests finish first), `reload_weights` from the
published folder over `collective_rpc`, a prefix-cache reset (cached KV was computed by the old
weights) and resume.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from workers.serving.guard import TOKEN_VARIABLE, RequireServeToken

RELOAD_TIMEOUT_S = 600.0
TOOL_CALL_PARSER = "hermes"  # <tool_call>{...}</tool_call>, as our tiny model's template writes


def free_port(host: str) -> int:
    """A port nothing listens on now, for vLLM to bind (it takes a number, not a socket)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ServerFailed(RuntimeError):
    """The vLLM server could not start or stopped; the message says why (its last log lines)."""


@dataclass(frozen=True)
class ServerOptions:
    kv_cache_bytes: int
    gpu_bytes: int | None  # the GPU's memory; None: CPU
    token: str
    host: str  # where the server listens
    public_host: str  # where the API reaches it
    log_dir: Path


def model_dtype(path: Path) -> str:
    """The dtype the folder's weights were saved in (config.json), else vLLM's choice: vLLM's
    own default would serve a float32 model in 16 bits, and its log-probs would then differ
    from the trained model's."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return "auto"
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if dtype in ("float32", "float16", "bfloat16") else "auto"


class VLLMServer:
    def __init__(self, name: str, path: Path, options: ServerOptions, need: int) -> None:
        """`need`: the bytes the model is expected to take (its share of a GPU)."""
        self.name, self.path, self.options, self.need = name, path, options, need
        self.port = free_port(options.host)
        self.url = f"http://{options.public_host}:{self.port}"
        self.log = options.log_dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        o = self.options
        command = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.path),
            "--served-model-name",
            self.name,
            "--host",
            o.host,
            "--port",
            str(self.port),
            "--middleware",
            f"{RequireServeToken.__module__}.{RequireServeToken.__name__}",
            "--dtype",
            model_dtype(self.path),
            "--kv-cache-memory-bytes",
            str(o.kv_cache_bytes),
            "--enable-prefix-caching",
            "--enable-auto-tool-choice",
            "--tool-call-parser",
            TOOL_CALL_PARSER,
            "--disable-uvicorn-access-log",
            "--disable-log-stats",
        ]
        if o.gpu_bytes is None:
            command.append("--enforce-eager")  # on CPU, compiling costs more than it saves
        else:  # several servers share the GPU: each takes its model's part
            command += ["--gpu-memory-utilization", f"{min(1.0, self.need / o.gpu_bytes):.4f}"]
        return command

    def start(self, timeout: float) -> None:
        """Start the server and wait until it answers; ServerFailed when it exits first or is
        not up within `timeout` seconds."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = dict(
            os.environ,
            VLLM_SERVER_DEV_MODE="1",  # reload_weights, reset_prefix_cache (behind our guard)
            **{TOKEN_VARIABLE: self.options.token},
        )
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerFailed(
                    f"vLLM could not serve {self.name} (exit code {self.proc.returncode}): "
                    f"{self.last_words()}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise ServerFailed(f"vLLM did not serve {self.name} within {timeout:.0f} s")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def reload(self, path: Path) -> None:
        """Swap in the weights of the folder `path` (the same architecture), in place."""
        headers = {"Authorization": f"Bearer {self.options.token}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=RELOAD_TIMEOUT_S) as client:
            steps = [
                ("/pause", {"params": {"mode": "wait"}}),
                (
                    "/collective_rpc",
                    {"json": {"method": "reload_weights", "kwargs": {"weights_path": str(path)}}},
                ),
                ("/reset_prefix_cache", {}),
                ("/resume", {}),
            ]
            for route, kwargs in steps:
                response = client.post(route, **kwargs)
                if response.status_code >= 400:
                    raise ServerFailed(
                        f"vLLM could not reload {self.name} from {path} ({route}: "
                        f"{response.status_code} {response.text[:500]})"
                    )
        self.path = path

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):  # the server and its engine process
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def last_words(self, lines: int = 5) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        errors = [line for line in text if "Error" in line or "error" in line]
        return " | ".join((errors or text)[-lines:])[-1500:]
