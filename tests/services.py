"""The servers the tests start, each on a port no other process can take from it, and each
waited for until it answers.

- In this process: an ASGI app under uvicorn in a thread (ThreadServer; serve_api for the API),
  on a loopback socket bound here, to a port the system assigns, before the server starts.
- The embedded stack (start_stack): its parent process binds the API's port the same way.
- Programs that only take a port number (PostgreSQL, redis-server, moto's S3 server, and gRPC
  inside the API): a free port, and another one when the server could not start because a
  process took that one meanwhile.

PostgreSQL and redis-server are the production servers, throwaway, without persistence; `make
services` installs them when missing. (bench/api_load.py starts its PostgreSQL with Postgres,
outside pytest: this module imports pytest only to fail a test.)
"""

import contextlib
import glob
import itertools
import os
import shutil
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn

from service.config import Settings
from service.stack import Stack, free_port, stack_env

from factories import SERVER_START_S, WORKER_S, auth, copy_rows, upload, wait_until

ATTEMPTS = 3  # starts on a new port after a port another process took


class ServerDidNotStart(RuntimeError):
    pass


def loopback_socket() -> socket.socket:
    """A listening loopback socket on a port the system assigns."""
    return socket.create_server(("127.0.0.1", 0))


@contextmanager
def closed_port():
    """A loopback port held bound, and not listening, for the block: a connection to it is
    refused, and no other process can start listening there meanwhile."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def _answers(url: str, ok: set[int] | None = None) -> bool:
    """An HTTP answer from `url` (of one of the `ok` statuses, when given)."""
    try:
        status = httpx.get(url, timeout=5).status_code
    except httpx.TransportError:
        return False
    return ok is None or status in ok


# ---------------------------------------------------------------- in this process


class ThreadServer:
    """An ASGI app served by uvicorn in a thread of this process, on `sock` (default: a new
    loopback socket). `with` returns once it answers HTTP: at `ready_path` with a 200 when
    given, else with any status."""

    def __init__(
        self,
        app,
        sock: socket.socket | None = None,
        ready_path: str | None = None,
        **config,
    ) -> None:
        self.socket = sock or loopback_socket()
        self.port = self.socket.getsockname()[1]
        self.ready_path = ready_path
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **config))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )

    def start(self) -> "ThreadServer":
        self.thread.start()
        wait_until(
            lambda: self.server.started or not self.thread.is_alive(),
            SERVER_START_S,
            "uvicorn to start serving",
        )
        if not self.server.started:  # its lifespan failed; uvicorn logged why
            self.socket.close()
            raise ServerDidNotStart(f"the app on port {self.port} did not start (see the log)")
        url = f"http://127.0.0.1:{self.port}{self.ready_path or '/'}"
        wait_until(
            lambda: _answers(url, {200} if self.ready_path else None),
            SERVER_START_S,
            f"{url} to answer",
        )
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()

    def __enter__(self) -> "ThreadServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def serve_api(settings: Settings, grpc: bool = False, **changes):
    """The API (create_app) served in a thread, ready (/readyz); yields its settings: `changes`
    applied and api_port the port it serves on, which reward callbacks reach. grpc: its gRPC
    server too, on grpc_port (a number the app binds itself: tried again on another one when
    a process took it meanwhile)."""
    from service.edge import SERVER
    from service.main import create_app

    for attempt in range(1, ATTEMPTS + 1):
        sock = loopback_socket()
        update = {"api_port": sock.getsockname()[1], **changes}
        if grpc:
            update["grpc_port"] = free_port()
        live = settings.model_copy(update=update)
        server = ThreadServer(create_app(live), sock, ready_path="/readyz", **SERVER)
        try:
            server.start()
            break
        except ServerDidNotStart:
            if not grpc or attempt == ATTEMPTS:
                raise
    try:
        yield live
    finally:
        server.stop()


# ---------------------------------------------------------------- the embedded stack


def _gvpo(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env=stack_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )


def cli(settings: Settings, *args: str) -> str:
    """`gvpo ARGS` with these settings; its standard output."""
    out = _gvpo(settings, *args)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def cli_refusal(settings: Settings, *args: str) -> str:
    """The standard error of `gvpo ARGS`, which must fail as a user should see it: a message,
    no traceback."""
    out = _gvpo(settings, *args)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    return out.stderr


def stack_settings(root: Path, **changes) -> Settings:
    """Settings of an embedded stack under `root`: the API on a port the stack binds (0: one
    the system assigns), gRPC off until start_stack, a heartbeat a second."""
    return Settings(data_dir=root, api_port=0, grpc_port=0, heartbeat_seconds=1.0, **changes)


def start_stack(settings: Settings, log_dir: Path) -> Stack:
    """The embedded stack (API and worker processes, gRPC on), started and ready."""
    log = log_dir / "api.log"
    for attempt in range(1, ATTEMPTS + 1):
        seen = log.stat().st_size if log.exists() else 0
        stack = Stack(settings.model_copy(update={"grpc_port": free_port()}), log_dir=log_dir)
        try:
            return stack.start(ready_timeout=4 * SERVER_START_S)
        except RuntimeError as exc:
            # taken before the stack started (its check) or while the API child bound it
            said = str(exc).encode()
            if log.exists():
                with log.open("rb") as fh:
                    fh.seek(seen)
                    said += fh.read()
            if b"cannot serve gRPC" not in said or attempt == ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def stack_project(stack: Stack, name: str, rows: int = 16) -> tuple[httpx.Client, str]:
    """A new project on the stack: an HTTP client with its key, and the id of a training file
    of `rows` rows of the copy task it uploaded."""
    key = cli(stack.settings, "api-key", "create", "--project", name)
    http = httpx.Client(base_url=stack.url, headers=auth(key), timeout=60)
    return http, upload(http, None, copy_rows(rows), filename="t.jsonl")


def process_tree(root: int) -> set[int]:
    """`root` and every live process below it. (Found by parent pid: the environment cannot
    mark them, since Celery's setproctitle reuses the memory /proc/PID/environ reads from.)"""
    parents = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit():
                # after the parenthesised command name: state, then the parent's pid
                state, ppid = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:2]
                if state != "Z":  # a zombie has exited; it only waits to be reaped
                    parents[int(proc.name)] = int(ppid)
        except (OSError, ValueError):
            continue
    tree, grew = {root} & parents.keys(), True
    while grew:
        below = {pid for pid, ppid in parents.items() if ppid in tree} - tree
        tree |= below
        grew = bool(below)
    return tree


def gvpo_up(settings) -> tuple[subprocess.Popen, str]:
    """`gvpo up` with these settings, once it says it is up: (its process, the API's URL). Its
    API listens on a port the system assigns (api_port 0); its gRPC port, a number, is chosen
    again when a process took it before the API could bind it."""
    for attempt in range(1, ATTEMPTS + 1):
        env = stack_env(settings.model_copy(update={"grpc_port": free_port()}))
        up = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "up"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines: list[str] = []
        reader = threading.Thread(target=lines.extend, args=(up.stdout,), daemon=True)
        reader.start()

        def up_or_gone(lines: list[str] = lines, up: subprocess.Popen = up) -> str | None:
            said = next((line for line in list(lines) if line.startswith("gvpo is up: API ")), None)
            return said or (None if up.poll() is None else "exited")

        said = wait_until(up_or_gone, 4 * SERVER_START_S, "gvpo up to say it is up")
        if said != "exited":
            return up, said.removeprefix("gvpo is up: API ").split()[0]
        reader.join(10)
        if "cannot serve gRPC" not in "".join(lines) or attempt == ATTEMPTS:
            raise AssertionError(f"gvpo up exited ({up.returncode}):\n{''.join(lines)}")
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- programs on a port number


def _missing(message: str) -> None:
    if "pytest" in sys.modules:
        import pytest

        pytest.fail(message)
    sys.exit(message)


def _binary(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name)]
    if not found[-1]:
        _missing(
            f"PostgreSQL's {name} is not installed: run `make services` (or .ci/ensure-services)"
        )
    return found[-1]


# A cluster the tests throw away need not survive a power cut: no fsync, so that creating a
# test's database and dropping it cost milliseconds, not seconds. Commits stay synchronous: a
# server killed mid-run (test_db_outage) must still keep every commit it acknowledged.
THROWAWAY = "-c fsync=off -c full_page_writes=off"


class Postgres:
    """A throwaway PostgreSQL cluster (initdb + pg_ctl) on a loopback port."""

    def __init__(self, root: Path, options: str = THROWAWAY) -> None:
        """`options`: the server's settings (postgres -c ...) besides where it listens."""
        self.root, self.port, self.options = root, None, options
        self.data, self.sockets = root / "data", root / "sockets"
        self.log = root / "log"
        # initdb refuses to run as root: the cluster belongs to the postgres user then
        self.as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        for d in (self.data, self.sockets):
            d.mkdir(parents=True)
            if self.as_owner:
                shutil.chown(d, "postgres", "postgres")
        if self.as_owner:
            shutil.chown(root, "postgres", "postgres")
        self._run(_binary("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *cmd: str) -> None:
        subprocess.run([*self.as_owner, *cmd], check=True, stdout=subprocess.DEVNULL)

    def start(self) -> None:
        """Returns once the server accepts connections (pg_ctl -w). The first start takes a
        free port, and another one if a process took it meanwhile; a restart keeps its port,
        which the URLs given out name."""
        for attempt in itertools.count(1):
            first = self.port is None
            if first:
                self.port = free_port()
            seen = self.log.stat().st_size if self.log.exists() else 0
            try:
                self._run(
                    _binary("pg_ctl"),
                    "-D",
                    str(self.data),
                    "-l",
                    str(self.log),
                    "-w",
                    "-o",
                    f"-p {self.port} -h 127.0.0.1 -k {self.sockets} {self.options}",
                    "start",
                )
                return
            except subprocess.CalledProcessError:
                with self.log.open("rb") as fh:
                    fh.seek(seen)
                    taken = b"Address already in use" in fh.read()
                if not (first and taken) or attempt == ATTEMPTS:
                    raise
                self.port = None

    def stop(self, mode: str = "fast") -> None:
        self._run(_binary("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def create_database(self, name: str, template: str | None = None) -> str:
        """A new database (a copy of `template` when given: a migrated template makes a fresh
        test database in a fraction of a second); returns its URL."""
        import psycopg

        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True
        ) as conn:
            conn.execute(
                f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")
            )
        return self.url.rsplit("/", 1)[0] + f"/{name}"


def drop_database(url: str) -> None:
    """Drop the PostgreSQL database at `url`, closing any connection still open to it."""
    import psycopg
    from sqlalchemy.engine import make_url

    where = make_url(url)
    with psycopg.connect(
        host=where.host, port=where.port, user=where.username, dbname="postgres", autocommit=True
    ) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{where.database}" WITH (FORCE)')


def start_redis(workdir: Path, port: int | None = None) -> tuple[subprocess.Popen, int]:
    """A throwaway redis-server on loopback, once it answers PING: (process, port). On `port`
    when given, else on a free port (another one when a process took it meanwhile)."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        _missing("redis-server is not installed: run `make services` (or .ci/ensure-services)")
    for attempt in range(1, ATTEMPTS + 1):
        at = port or free_port()
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(at),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],
            stdout=subprocess.DEVNULL,
        )

        def ours(at: int = at, proc: subprocess.Popen = proc) -> bool:
            """A redis-server that is this process, not one already there."""
            try:
                return redis.Redis(port=at).info("server")["process_id"] == proc.pid
            except redis.ConnectionError:
                return False

        wait_until(
            lambda proc=proc, ours=ours: proc.poll() is not None or ours(),
            SERVER_START_S,
            f"redis-server on port {at} to answer",
        )
        if proc.poll() is None:
            return proc, at
        if port is not None or attempt == ATTEMPTS:
            raise ServerDidNotStart(f"redis-server could not start on port {at}")
    raise AssertionError("unreachable")


def start_moto() -> tuple[subprocess.Popen, str]:
    """moto's S3 server on a free loopback port, once it answers: (process, URL)."""
    for attempt in range(1, ATTEMPTS + 1):
        url = f"http://127.0.0.1:{free_port()}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", url.rsplit(":", 1)[1]],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # moto's own API: another program that took the port would not answer it
        wait_until(
            lambda proc=proc, url=url: (
                proc.poll() is not None or _answers(f"{url}/moto-api/data.json", {200})
            ),
            SERVER_START_S,
            f"moto on {url} to answer",
        )
        if proc.poll() is None:
            return proc, url
        if attempt == ATTEMPTS:
            raise ServerDidNotStart(f"moto could not start on {url}")
    raise AssertionError("unreachable")


# A tracking server of MLflow's own (`make mlflow-venv`): a venv apart, as the full mlflow's
# pins clash with ours; the worker needs none of it (workers/tracking/mlflow_sink.py).
MLFLOW = Path(__file__).resolve().parents[1] / ".venv-mlflow" / "bin"
MLFLOW_START_S = 240.0  # its first start creates its database: half a minute on a busy machine


def start_mlflow(root: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on a free loopback port, its runs in SQLite and its artifacts under
    `root`, served by itself (mlflow-artifacts:/), once /health answers: (process, URL)."""
    for attempt in range(1, ATTEMPTS + 1):
        url = f"http://127.0.0.1:{free_port()}"
        log = (root / "mlflow.log").open("ab")
        proc = subprocess.Popen(
            [
                str(MLFLOW / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                url.rsplit(":", 1)[1],
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{root / 'mlflow.db'}",
                "--artifacts-destination",
                str(root / "artifacts"),
            ],
            cwd=root,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_until(
            lambda proc=proc, url=url: proc.poll() is not None or _answers(f"{url}/health", {200}),
            MLFLOW_START_S,
            f"mlflow server on {url} to answer (log: {root / 'mlflow.log'})",
            every=0.5,
        )
        if proc.poll() is None:
            return proc, url
        if attempt == ATTEMPTS:
            raise ServerDidNotStart(f"mlflow server could not start on {url}")
    raise AssertionError("unreachable")


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a server started in a session of its own, with its children (mlflow's workers)."""
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=3)  # a throwaway server: nothing to lose
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_grpc_serving(channel, timeout: float = SERVER_START_S) -> None:
    """Until the gRPC server's health service says SERVING (it says NOT_SERVING from its start
    until its first readiness check of the database and broker passes)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel)

    def serving() -> bool:
        try:
            answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        except grpc.RpcError:
            return False
        return answer.status == health_pb2.HealthCheckResponse.SERVING

    wait_until(serving, timeout, "the gRPC health service to say SERVING")


@contextmanager
def running_worker(settings: Settings, log_path: Path):
    """`gvpo worker` for `settings` as a child process, once Celery says it is ready (it
    consumes from then on); stopped, with its pool children, on exit."""
    import signal

    log = log_path.open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "worker"],
        env=stack_env(settings),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until(
            lambda: proc.poll() is not None or b" ready." in log_path.read_bytes(),
            WORKER_S,
            f"the worker to be ready (log: {log_path})",
        )
        assert proc.poll() is None, f"the worker exited: {log_path.read_text()[-2000:]}"
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@contextmanager
def reference_server(app: str, path: str, env: dict[str, str]):
    """One of examples/'s reference servers (`app`, "module:app"), served by uvicorn in a
    process of its own with `env` added to its environment; yields its URL + `path` once it
    answers (an unsigned request: 401)."""
    sock = loopback_socket()  # bound here, passed down: no race for the port
    url = f"http://127.0.0.1:{sock.getsockname()[1]}{path}"
    with sock:
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", app, "--fd", str(sock.fileno())],
            pass_fds=(sock.fileno(),),
            cwd=Path(__file__).resolve().parents[1],
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def answers() -> int | None:
        assert server.poll() is None, f"the reference server exited ({server.returncode})"
        try:
            return httpx.post(url, content=b"{}").status_code
        except httpx.TransportError:
            return None

    try:
        assert wait_until(answers, SERVER_START_S, f"{app} to answer") == 401  # unsigned
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)
