"""A throwaway PostgreSQL cluster on a loopback port (initdb + pg_ctl), for tests that need the
production database or need to take it down and bring it back."""

import glob
import os
import shutil
import subprocess
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
