"""Untrusted Python, run in a bubblewrap (`bwrap`) sandbox: the python_tool environment's tool
calls, and any other code a run asks the worker to execute.

What the code sees: the host's root file system read-only, minus the places where machines keep
state, users' files and checkouts (HIDDEN, the service's data directory and the caller's `hide`
list, each behind an empty read-only tmpfs, or /dev/null for a file); a fresh /proc (only its
own processes), a minimal /dev, and one writable place, a size-capped tmpfs at /tmp that is
also its working directory.
No network (a new, empty network namespace: not even loopback reaches the host), no inherited
environment variables, no capabilities, no new user namespaces, its own session (no terminal
to inject keystrokes into).

What bounds it: setrlimit through `prlimit` inside the sandbox, so that only the code is
limited: CPU seconds (SIGXCPU), address space (MemoryError), file size, and processes
(RLIMIT_NPROC). The kernel never applies RLIMIT_NPROC to a process whose real uid is the
host's root, even inside a user namespace that names it otherwise; a worker running as root
therefore starts bwrap as `nobody`, and then the limit counts the sandbox's processes (its user
namespace's) and stops a fork bomb. The wall-clock limit kills bwrap, whose init inside the
sandbox dies with it (--die-with-parent), and the kernel kills every other process of the
sandbox's PID namespace with its init.
"""

import contextlib
import os
import pwd
import re
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import IO, Protocol

from service.contract.environments import PythonToolParams
from workers.errors import RunError

# Where hosts keep what untrusted code must not read: home directories, services' state and
# sockets (/run holds e.g. docker.sock, which works across network namespaces), mounted volumes,
# installed applications and checkouts; /data and /models are the worker image's volumes.
HIDDEN = (
    "/home",
    "/root",
    "/run",
    "/var",
    "/srv",
    "/mnt",
    "/media",
    "/opt",
    "/work",
    "/app",
    "/data",
    "/models",
)
SCRATCH = "/tmp"  # the only writable directory, and the working directory
SCRATCH_FILES = 4  # the scratch tmpfs holds this many files of the largest size allowed
CODE_PATH = f"{SCRATCH}/main.py"  # read-only; tracebacks name it
ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": SCRATCH,
    "TMPDIR": SCRATCH,
    "LANG": "C.UTF-8",
}
KILL_GRACE_S = 2.0  # after a kill, how long the last output may take to arrive
MB = 1024 * 1024
INSTALL_HINT = (
    "install Debian's bubblewrap package (apt-get install bubblewrap; for the tests, "
    "run .ci/ensure-services)"
)


class SandboxUnavailable(RunError):
    """bwrap is missing or cannot create its namespaces here."""


class Limits(Protocol):
    """What bounds one run (PythonToolParams has these fields)."""

    timeout_s: float  # wall clock
    cpu_s: int
    memory_mb: int  # address space of each process
    processes: int  # processes and threads at once
    file_size_mb: int  # largest file written
    max_output_chars: int  # of stdout and stderr together


class Stop(StrEnum):
    """What ended a run before the code did."""

    TIMEOUT = "timeout"  # the wall-clock limit: killed
    CPU = "cpu"  # the CPU limit: SIGXCPU
    MEMORY = "memory"  # the address-space limit: MemoryError
    SIGNAL = "signal"  # any other signal


@dataclass(frozen=True)
class SandboxResult:
    exit_code: int | None  # None when a signal ended it
    output: str  # stdout and stderr interleaved, the middle cut past max_output_chars
    stopped: Stop | None
    signal: int | None
    elapsed_s: float
    cut_bytes: int = 0  # of output left out

    def status(self, limits: Limits) -> str:
        """One line for whoever reads the output, e.g. "[exit 1]", "[killed: time limit 5 s]"."""
        if self.stopped is Stop.TIMEOUT:
            return f"[killed: time limit {limits.timeout_s:g} s]"
        if self.stopped is Stop.CPU:
            return f"[killed: CPU time limit {limits.cpu_s} s]"
        if self.stopped is Stop.MEMORY:
            return f"[out of memory: limit {limits.memory_mb} MB]"
        if self.signal is not None:
            return f"[killed: signal {signal.Signals(self.signal).name}]"
        return f"[exit {self.exit_code}]"


# -- the command line --------------------------------------------------------------------------


@cache
def _bwrap() -> str:
    found = shutil.which("bwrap")
    if found is None:
        raise SandboxUnavailable(f"the Python sandbox needs bwrap: {INSTALL_HINT}")
    return found


def _sandbox_user() -> tuple[int, int] | None:
    """The (uid, gid) to start bwrap as: `nobody`'s when this process is root (see the
    module's docstring); None: this process's own."""
    if os.geteuid() != 0:
        return None
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        return 65534, 65534
    return nobody.pw_uid, nobody.pw_gid


def _reachable(path: Path, user: tuple[int, int] | None) -> bool:
    """Whether the sandbox's user can get to `path`: search (or run) it and every directory
    above it (`nobody`: by the permissions of others)."""
    if user is None:
        return os.access(path, os.X_OK)
    try:
        return all(p.stat().st_mode & stat.S_IXOTH for p in (path, *path.parents))
    except OSError:
        return False


@cache
def default_python() -> str:
    """The worker's own interpreter without its virtual environment (the standard library and
    the system's packages), or the system's python3 where the sandbox's user cannot reach it."""
    user = _sandbox_user()
    for candidate in (os.path.realpath(sys._base_executable), "/usr/bin/python3"):
        if _reachable(Path(candidate), user):
            return os.path.realpath(candidate)
    raise SandboxUnavailable("no Python interpreter the sandbox's user can run")


def _under(path: Path, parents: Iterable[Path]) -> bool:
    return any(path == p or p in path.parents for p in parents)


def _hidden(
    data_dir: Path | None, hide: Iterable[str | Path], user: tuple[int, int] | None
) -> list[Path]:
    """The existing paths to cover, outermost only; a path the sandbox's user cannot reach
    anyway is left alone (bwrap, running as that user, could not mount over it)."""
    wanted = [Path(p).resolve() for p in (*HIDDEN, *hide)]
    if data_dir is not None:
        wanted.append(Path(data_dir).resolve())
    covered: list[Path] = [Path(SCRATCH), Path("/proc"), Path("/dev")]
    out: list[Path] = []
    for path in sorted(set(wanted), key=lambda p: len(p.parts)):
        if path == Path("/"):
            raise ValueError("the sandbox cannot hide the root directory")
        if _under(path, covered) or not path.exists() or not _reachable(path.parent, user):
            continue
        covered.append(path)
        out.append(path)
    return out


def bwrap_command(
    limits: Limits,
    code_fd: int,
    *,
    python: str,
    data_dir: Path | None = None,
    hide: Iterable[str | Path] = (),
) -> list[str]:
    """The command that runs the file read from `code_fd` under `limits`."""
    file_size = limits.file_size_mb * MB
    argv = [
        _bwrap(),
        "--unshare-all",  # network, PID, IPC, UTS, cgroup
        "--unshare-user",
        "--disable-userns",
        "--cap-drop",
        "ALL",
        "--die-with-parent",
        "--new-session",
        "--hostname",
        "sandbox",
        "--clearenv",
    ]
    for key, value in ENV.items():
        argv += ["--setenv", key, value]
    argv += ["--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev"]
    argv += ["--size", str(file_size), "--tmpfs", "/dev/shm", "--remount-ro", "/dev"]
    argv += ["--size", str(SCRATCH_FILES * file_size), "--tmpfs", SCRATCH]
    hidden = _hidden(data_dir, hide, _sandbox_user())
    for path in hidden:  # an empty directory, or an empty file
        if path.is_dir():
            argv += ["--size", "4096", "--tmpfs", str(path)]
        else:
            argv += ["--ro-bind", "/dev/null", str(path)]
    prefix = Path(python).resolve().parents[1]  # <prefix>/bin/python3.x
    if _under(prefix, hidden):
        argv += ["--ro-bind", str(prefix), str(prefix)]
    for path in hidden:  # read-only too (after the prefix's mount point is made in one)
        if path.is_dir():
            argv += ["--remount-ro", str(path)]
    argv += ["--ro-bind-data", str(code_fd), CODE_PATH, "--chdir", SCRATCH, "--"]
    argv += [
        "prlimit",
        f"--cpu={limits.cpu_s}:{limits.cpu_s + 1}",  # SIGXCPU, then SIGKILL a second later
        f"--as={limits.memory_mb * MB}",
        f"--fsize={file_size}",
        f"--nproc={limits.processes + 1}",  # and bwrap's init inside the sandbox
        "--core=0",
        "--",
        python,
        "-I",  # no PYTHON* variables, user site or script directory on sys.path
        "-u",  # unbuffered: what it printed before a kill is kept
        CODE_PATH,
    ]
    return argv


# -- running -----------------------------------------------------------------------------------


class _Output:
    """The first and the last `cap` bytes of a stream, and how many came in all."""

    def __init__(self, max_chars: int) -> None:
        self.max_chars = max_chars
        self.cap = 4 * max_chars  # a character is at most 4 bytes of UTF-8
        self.head, self.tail, self.total = bytearray(), bytearray(), 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.cap - len(self.head)
        self.head += chunk[:room]
        self.tail += chunk[room:]
        del self.tail[: max(0, len(self.tail) - self.cap)]

    def text(self) -> tuple[str, int]:
        """At most max_chars characters: all of it, or its start and end around a marker."""
        head = self.head.decode("utf-8", "replace")
        tail = self.tail.decode("utf-8", "replace")
        if self.total == len(self.head) and len(head) <= self.max_chars:
            return head, 0
        if not tail:  # all of it is in head: cut within it
            tail = head
        keep_end = self.max_chars // 2
        start = head[: self.max_chars - keep_end]
        end = tail[len(tail) - keep_end :] if keep_end else ""
        cut = max(0, self.total - len(start.encode()) - len(end.encode()))
        return f"{start}\n[... {cut} bytes of output cut ...]\n{end}", cut


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _read(proc: subprocess.Popen, out: _Output, deadline: float) -> bool:
    """Collect the output until its end or `deadline`; True when the deadline came first."""
    fd = proc.stdout.fileno()
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            if sel.select(left):
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    return False
                out.add(chunk)


def _outcome(
    returncode: int, timed_out: bool, text: str
) -> tuple[int | None, Stop | None, int | None]:
    """(exit code, what stopped it, signal) from bwrap's status, which is the code's own, or
    128 + the signal that ended it (its init's convention); negative: bwrap itself was killed."""
    if timed_out:
        return None, Stop.TIMEOUT, signal.SIGKILL
    if returncode < 0:
        return None, Stop.SIGNAL, -returncode
    if returncode > 128 and returncode - 128 in signal.valid_signals():
        sig = returncode - 128
        return None, Stop.CPU if sig == signal.SIGXCPU else Stop.SIGNAL, sig
    if returncode != 0 and re.search(r"^MemoryError\b", text[-2000:], re.MULTILINE):
        return returncode, Stop.MEMORY, None
    return returncode, None, None


def _popen(
    code_file: IO[bytes],
    limits: Limits,
    stdin: IO[bytes] | int,
    *,
    data_dir: Path | None,
    hide: Iterable[str | Path],
    python: str | None,
) -> subprocess.Popen:
    """bwrap running the code in `code_file` under `limits`, as the sandbox's user, in a
    process group of its own; its stdout and stderr are one pipe."""
    argv = bwrap_command(
        limits, code_file.fileno(), python=python or default_python(), data_dir=data_dir, hide=hide
    )
    user = _sandbox_user()
    as_user = {} if user is None else {"user": user[0], "group": user[1], "extra_groups": []}
    return subprocess.Popen(
        argv,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=ENV,
        pass_fds=(code_file.fileno(),),
        start_new_session=True,  # one process group to kill
        **as_user,
    )


def run_python(
    code: str,
    limits: Limits,
    stdin: str = "",
    *,
    data_dir: Path | None = None,
    hide: Iterable[str | Path] = (),
    python: str | None = None,
) -> SandboxResult:
    """Run `code` as a script in a new sandbox under `limits`, with `stdin` as its standard
    input; hide `data_dir` and the `hide` paths besides HIDDEN. `python`: the interpreter
    (default_python()). Raises SandboxUnavailable when bwrap is missing."""
    started = time.monotonic()
    with tempfile.TemporaryFile() as code_file, tempfile.TemporaryFile() as stdin_file:
        code_file.write(code.encode())
        code_file.seek(0)
        stdin_file.write(stdin.encode())
        stdin_file.seek(0)
        proc = _popen(code_file, limits, stdin_file, data_dir=data_dir, hide=hide, python=python)
    out = _Output(limits.max_output_chars)
    with proc:
        timed_out = _read(proc, out, started + limits.timeout_s)
        if not timed_out:  # its output ended: it may still run (it closed stdout)
            try:
                proc.wait(max(0.0, started + limits.timeout_s - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
        if timed_out:
            _kill(proc)
            _read(proc, out, time.monotonic() + KILL_GRACE_S)
        returncode = proc.wait()
    text, cut = out.text()
    exit_code, stopped, sig = _outcome(returncode, timed_out, text)
    return SandboxResult(exit_code, text, stopped, sig, time.monotonic() - started, cut)


def start_python(
    code: str,
    limits: Limits,
    *,
    data_dir: Path | None = None,
    hide: Iterable[str | Path] = (),
    python: str | None = None,
) -> subprocess.Popen:
    """Start `code` in a new sandbox under `limits` (all but its wall time and output size,
    which are the caller's to watch) and leave it running: a program to talk to through its
    stdin and stdout pipes (stderr joins stdout). The caller ends it with stop()."""
    with tempfile.TemporaryFile() as code_file:
        code_file.write(code.encode())
        code_file.seek(0)
        return _popen(
            code_file, limits, subprocess.PIPE, data_dir=data_dir, hide=hide, python=python
        )


def stop(proc: subprocess.Popen) -> int:
    """Kill a sandbox start_python() started, everything in it with it; its exit status."""
    if proc.poll() is None:  # else its PID namespace, and all in it, ended with it
        _kill(proc)
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()
    return proc.wait()


@cache
def check_sandbox(python: str | None = None) -> None:
    """Raise SandboxUnavailable, with bwrap's reason, unless a sandbox starts here."""
    result = run_python("print('ready')", PythonToolParams(timeout_s=30), python=python)
    if result.output.strip() != "ready":
        raise SandboxUnavailable(
            f"the Python sandbox (bwrap) cannot start here: {result.output.strip()[-500:]}"
        )
