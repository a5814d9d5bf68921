"""The embedded stack: the API server and one worker as child processes of this one.

Used by `gvpo up` (foreground), `gvpo demo` and the tests. Both children get the same GVPO_*
environment, so they share the SQLite database and the file-backed broker under data_dir.

This process binds the API's port and hands the listening socket to the API child: a port that
is taken fails at once with a clear message, and GVPO_API_PORT=0 takes a port the system assigns
(`Stack.url` says which) with no window in which another process could take it first.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from service.config import Settings


def free_port() -> int:
    """A port nothing listens on now. Only a number: another process may take it before the
    caller binds it, so a server we start ourselves should bind port 0 instead (listen_socket)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (0: a port the system assigns) and listening, for a
    server to serve on (uvicorn's `sockets=`), in this process or in a child it is passed to."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise RuntimeError(
            f"cannot serve the API on {host}:{port} (GVPO_API_PORT): {exc}"
        ) from None


def serve_api(fd: int) -> None:
    """The API child: the app served on the listening socket its parent passed down as `fd`."""
    import uvicorn

    from service.config import get_settings
    from service.edge import SERVER
    from service.main import UnsafeSettings, create_app

    try:
        app = create_app(get_settings())
    except UnsafeSettings as exc:
        sys.exit(f"Error: {exc}")
    config = uvicorn.Config(app, log_level="info", **SERVER)
    uvicorn.Server(config).run(sockets=[socket.socket(fileno=fd)])


def stack_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "GVPO_DATA_DIR": str(settings.resolved_data_dir),
            "GVPO_DATABASE_URL": settings.resolved_database_url,
            "GVPO_BROKER_URL": settings.broker_url,
            "GVPO_API_HOST": settings.api_host,
            "GVPO_API_PORT": str(settings.api_port),
            "GVPO_GRPC_PORT": str(settings.grpc_port),
            "GVPO_TORCH_THREADS": str(settings.torch_threads),
            "GVPO_LEASE_SECONDS": str(settings.lease_seconds),
            "GVPO_HEARTBEAT_SECONDS": str(settings.heartbeat_seconds),
            "GVPO_REAPER_INTERVAL_S": str(settings.reaper_interval_s),
            "GVPO_WORKER_QUEUES": settings.worker_queues,
        }
    )
    if settings.checkpoint_url:
        env["GVPO_CHECKPOINT_URL"] = settings.checkpoint_url
    if settings.model_roots is not None:
        env["GVPO_MODEL_ROOTS"] = settings.model_roots
    # A cluster's secrets (the embedded stack makes its own); never put into the environment
    # when unset, so a child never sees an empty value.
    for name, value in (
        ("GVPO_SECRET_KEY", settings.secret_key),
        ("GVPO_API_KEY_PEPPER", settings.api_key_pepper),
        ("GVPO_METRICS_TOKEN", settings.metrics_token),
        ("GVPO_ENCRYPTION_KEY", settings.encryption_key),
    ):
        if value:
            env[name] = value
    # Small models on few cores run far faster single-threaded (the worker also sets torch).
    env.setdefault("OMP_NUM_THREADS", str(settings.torch_threads))
    return env


class Stack:
    """API + worker subprocesses; logs go to `log_dir` when given, else to this terminal."""

    def __init__(self, settings: Settings, log_dir: Path | None = None) -> None:
        self.settings, self.log_dir = settings, log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        return f"http://{self.settings.api_host}:{self.settings.api_port}"

    def _spawn(self, name: str, command: list[str], pass_fds: tuple[int, ...] = ()) -> None:
        out = None
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - lives with the child
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", *command],
            env=stack_env(self.settings),
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            pass_fds=pass_fds,
            # Own process group: stop() can then end the worker's pool children with it.
            start_new_session=True,
        )

    def _spawn_api(self) -> None:
        """Bind the API's port here, then start the API child serving on that socket; the
        settings the children get name the port bound."""
        with listen_socket(self.settings.api_host, self.settings.api_port) as sock:
            port = sock.getsockname()[1]
            self.settings = self.settings.model_copy(update={"api_port": port})
            self._spawn("api", ["service.stack", str(sock.fileno())], (sock.fileno(),))

    def start(self, ready_timeout: float = 60.0) -> "Stack":
        try:
            self._spawn_api()
            self._spawn("worker", ["service.cli", "worker"])
            self.wait_ready(ready_timeout)
        except BaseException:
            self.stop(grace=2)  # never leave half a stack running
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with code {proc.returncode} while starting"
                        + (f"; see {self.log_dir / (name + '.log')}" if self.log_dir else "")
                    )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the API at {self.url} was not ready after {timeout:.0f} s")

    def start_worker(self) -> None:
        """A new worker process, in place of one that died."""
        self._spawn("worker", ["service.cli", "worker"])

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM both; whatever is still alive after `grace` seconds is killed with its group.

        Celery's warm shutdown would wait for a whole run to finish, so a run still training
        when the grace period ends is killed mid-step (its last checkpoint stays on disk).
        """
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":  # the API child of a Stack: python -m service.stack FD
    serve_api(int(sys.argv[1]))
