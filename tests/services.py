"""The production servers, throwaway, on loopback ports: a PostgreSQL cluster (initdb +
pg_ctl) and redis-server without persistence. `make services` installs them when missing."""

import contextlib
import glob
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from service.stack import free_port


def _binary(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name)]
    if not found[-1]:
        pytest.fail(f"PostgreSQL's {name} is not installed: run `make services` "
                    "(or .ci/ensure-services)")
    return found[-1]


class Postgres:
    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.data, self.sockets = root / "data", root / "sockets"
        # initdb refuses to run as root: the cluster belongs to the postgres user then
        self.as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        for d in (self.data, self.sockets):
            d.mkdir(parents=True)
            if self.as_owner:
                shutil.chown(d, "postgres", "postgres")
        if self.as_owner:
            shutil.chown(root, "postgres", "postgres")
        self._run(_binary("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *cmd: str) -> None:
        subprocess.run([*self.as_owner, *cmd], check=True, stdout=subprocess.DEVNULL)

    def start(self) -> None:
        self._run(_binary("pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-w",
                  "-o", f"-p {self.port} -h 127.0.0.1 -k {self.sockets}", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(_binary("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def create_database(self, name: str, template: str | None = None) -> str:
        """A new database (a copy of `template` when given: a migrated template makes a fresh
        test database in a fraction of a second); returns its URL."""
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        return self.url.rsplit("/", 1)[0] + f"/{name}"


def start_redis(port: int, workdir: Path) -> subprocess.Popen:
    """A throwaway redis-server on loopback; returns once it answers PING."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: run `make services` (or .ci/ensure-services)")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL)
    import redis

    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis(port=port).ping()
            return proc
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.1)


@contextmanager
def running_worker(settings, log_path: Path, ready_within_s: float = 120.0):
    """`gvpo worker` for `settings` as a child process, once Celery says it is ready (it
    consumes from then on); stopped, with its pool children, on exit."""
    import signal

    from service.stack import stack_env

    log = log_path.open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "worker"],
                            env=stack_env(settings), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + ready_within_s
        while b" ready." not in log_path.read_bytes():
            assert proc.poll() is None, f"the worker exited: {log_path.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"the worker was not ready: {log_path}"
            time.sleep(0.1)
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
