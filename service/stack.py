"""The embedded stack: the API server, one worker and one inference worker (gvpo serve; unless
GVPO_SERVE_IN_STACK is false) as child processes of this one.

Used by `gvpo up` (foreground), `gvpo demo` and the tests. Both children get the same GVPO_*
environment, so they share the SQLite database and the file-backed broker under data_dir.

Before it starts anything, this process takes the data directory (a lock no second stack on it
can take), binds the API's port, whose listening socket the API child is handed, and checks that
the gRPC port is free: a folder or a port in use fails at once with a clear message, and
GVPO_API_PORT=0 takes a port the system assigns (`Stack.url` says which) with no window in which
another process could take it first.
"""

import contextlib
import errno
import fcntl
import os
import re
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


class StackError(RuntimeError):
    """The stack cannot start or stopped running; the message says why and what to do."""


LOCK_FILE = "stack.lock"  # in the data directory, held by the stack's process while it runs


def listen_socket(
    host: str, port: int, serving: str = "the API", setting: str = "GVPO_API_PORT"
) -> socket.socket:
    """A TCP socket bound to host:port (0: a port the system assigns) and listening, for a
    server to serve on (uvicorn's `sockets=`), in this process or in a child it is passed to.
    StackError, naming `serving` and its `setting`, when it cannot be."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        hint = (
            f": another process listens there (another gvpo up?); stop it, or set {setting} "
            "to another port"
            if exc.errno == errno.EADDRINUSE
            else f" ({setting}, GVPO_API_HOST): {exc.strerror or exc}"
        )
        raise StackError(f"cannot serve {serving} on {host}:{port}{hint}") from None


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
            "GVPO_SCHEDULE_INTERVAL_S": str(settings.schedule_interval_s),
            "GVPO_GANG_JOIN_TIMEOUT_S": str(settings.gang_join_timeout_s),
            "GVPO_WORKER_QUEUES": settings.worker_queues,
            "GVPO_WEBHOOK_ALLOW_PRIVATE": str(settings.webhook_allow_private).lower(),
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
        ("GVPO_NODE_ADDRESS", settings.node_address),
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
        self._lock = None  # the data directory's lock file, open while the stack holds it
        self._api_socket: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://{self.settings.api_host}:{self.settings.api_port}"

    def log(self, name: str) -> Path | None:
        """Where the output of child `name` ("api", "worker", "serve") goes (None: here)."""
        return self.log_dir / f"{name}.log" if self.log_dir else None

    def claim(self) -> "Stack":
        """Take what the stack needs before anything starts: its data directory, the API's port
        (bound here, for the API child) and the gRPC port (checked free). StackError at once
        when one is in use, with nothing taken."""
        try:
            self._lock_data_dir()
            host = self.settings.api_host
            self._api_socket = listen_socket(host, self.settings.api_port)
            if self.settings.grpc_port:  # the API child binds it; a check that it could
                listen_socket(host, self.settings.grpc_port, "gRPC", "GVPO_GRPC_PORT").close()
        except BaseException:
            self._release()
            raise
        port = self._api_socket.getsockname()[1]
        self.settings = self.settings.model_copy(update={"api_port": port})
        return self

    def _lock_data_dir(self) -> None:
        """One stack per data directory: a second one would run a second worker on the same
        database and broker. The lock is the kernel's (flock), so it goes with the process
        that held it, however that process ended."""
        data = self.settings.resolved_data_dir
        data.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = (data / LOCK_FILE).open("a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip()
            lock.close()
            raise StackError(
                f"another gvpo up{f' ({holder})' if holder else ''} uses the data directory "
                f"{data}: stop it first, or set GVPO_DATA_DIR to another folder"
            ) from None
        lock.truncate(0)
        lock.write(f"pid {os.getpid()}\n")
        lock.flush()
        self._lock = lock

    def _release(self) -> None:
        if self._api_socket:
            self._api_socket.close()
            self._api_socket = None
        if self._lock:
            self._lock.close()  # which releases the flock
            self._lock = None

    def _spawn(self, name: str, command: list[str], pass_fds: tuple[int, ...] = ()) -> None:
        out = None
        if log := self.log(name):
            log.parent.mkdir(parents=True, exist_ok=True)
            out = log.open("ab")  # noqa: SIM115 - lives with the child
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", *command],
            env=stack_env(self.settings),
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            pass_fds=pass_fds,
            # Own process group: stop() can then end the worker's pool children with it.
            start_new_session=True,
        )

    def start(self, ready_timeout: float = 60.0) -> "Stack":
        try:
            if self._api_socket is None:
                self.claim()
            fd = self._api_socket.fileno()
            self._spawn("api", ["service.stack", str(fd)], (fd,))
            self._api_socket.close()  # the API child serves on its copy
            self._api_socket = None
            self._spawn("worker", ["service.cli", "worker"])
            if self.settings.serve_in_stack:
                self._spawn("serve", ["service.cli", "serve"])
            self.wait_ready(ready_timeout)
        except BaseException:
            self.stop(grace=2)  # never leave half a stack running
            raise
        return self

    def exited(self) -> str | None:
        """What a child that has ended says (its name, how it ended, its last words and its
        log); None while they all run."""
        for name, proc in self.procs.items():
            if (code := proc.poll()) is None:
                continue
            log = self.log(name)
            if code < 0:
                said = f"the {name} process was killed by {_signal_name(-code)}"
            else:
                last = _last_word(log) if log else ""
                said = f"the {name} process exited with code {code}" + (f": {last}" if last else "")
            return said + (f" (its log: {log})" if log else "")
        return None

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if exited := self.exited():
                raise StackError(f"{exited}, while starting")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise StackError(f"the API at {self.url} was not ready after {timeout:.0f} s")

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
        self._release()

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


_RAISED = re.compile(r"^[\w.]*(Error|Exception): ")  # the last line of a traceback


def _last_word(path: Path, tail: int = 16384) -> str:
    """What a child's log says last about why it stopped: the last exception it printed (the
    line after uvicorn's "Application startup failed" traceback), else its last line."""
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - tail))
            lines = [line.strip() for line in fh.read().decode(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [line for line in lines if line] or [""]
    return next((line for line in reversed(lines) if _RAISED.match(line)), lines[-1])


if __name__ == "__main__":  # the API child of a Stack: python -m service.stack FD
    serve_api(int(sys.argv[1]))
