"""Graders that run untrusted code (`python`, `code_tests`) talk to a harness script in a
bubblewrap sandbox (workers/sandbox.py), one JSON line each way per request, so that one
sandbox serves a whole batch instead of one sandbox per grading.

When a sandbox dies in the middle of a batch (a limit killed it, the code called os._exit,
crashed the interpreter or overran the time its request was given), the item it was working on
is tried again alone in a fresh sandbox, so that only an item that kills a sandbox by itself is
failed, and the batch goes on in another sandbox. A sandbox that cannot start at all is the
worker's problem, not the user's: SandboxUnavailable (a RunError) fails the run.
"""

import contextlib
import json
import math
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import make_url

from workers.sandbox import SandboxUnavailable, start_python, stop

if TYPE_CHECKING:
    from service.config import Settings

HARNESS_DIR = Path(__file__).parent / "harness"
START_S = 30.0  # for the sandbox and its interpreter to start (a loaded machine is slow)
GRACE_S = 2.0  # past a request's own time limit, before the sandbox is killed
CLOSE_S = 0.5  # for a harness to exit once its requests end
MAX_LINE = 64 * 1024 * 1024  # bytes of one answer
MIN_PER_SANDBOX = 16  # items: fewer share one sandbox rather than start another


class SandboxDied(Exception):
    """The sandbox ended, or was killed, before it answered."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SandboxLimits:
    """What bounds one grading sandbox (the workers.sandbox.Limits protocol)."""

    timeout_s: float  # unused here: each request has its own deadline
    cpu_s: int  # of each process in the sandbox
    memory_mb: int  # address space of each process
    processes: int = 32
    file_size_mb: int = 16
    max_output_chars: int = 0  # unused: answers are read line by line


def harness(name: str) -> str:
    """The source of a harness script (workers/graders/harness/<name>.py)."""
    return (HARNESS_DIR / f"{name}.py").read_text()


def hidden_paths(settings: "Settings") -> tuple[Path, ...]:
    """What the code must not see besides the sandbox's defaults: the service's data
    directory, a SQLite database kept elsewhere, and a .env file beside the worker."""
    paths = [settings.resolved_data_dir]
    url = make_url(settings.resolved_database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        paths.append(Path(url.database).resolve().parent)
    env_file = Path.cwd() / ".env"
    if env_file.exists():
        paths.append(env_file)
    return tuple(paths)


def _died(returncode: int | None, killed_for: str | None) -> str:
    """Why a sandbox ended, for a person."""
    if killed_for is not None:
        return killed_for
    if returncode is None:
        return "it stopped answering"
    if returncode < 0 or returncode > 128:
        number = -returncode if returncode < 0 else returncode - 128
        with contextlib.suppress(ValueError):
            sig = signal.Signals(number)
            if sig == signal.SIGXCPU:
                return "killed at its CPU time limit"
            if sig == signal.SIGKILL:
                return "killed (SIGKILL: a memory, process or time limit)"
            return f"killed by {sig.name}"
    return f"the interpreter exited (status {returncode}) before answering"


class SandboxSession:
    """One harness in one sandbox: send a request, read its answer, within a deadline."""

    def __init__(
        self,
        code: str,
        limits: SandboxLimits,
        *,
        hide: Sequence[str | Path] = (),
        python: str | None = None,
    ) -> None:
        self.proc = start_python(code, limits, hide=hide, python=python)
        self.buffer = bytearray()
        self.selector = selectors.DefaultSelector()
        os.set_blocking(self.proc.stdout.fileno(), False)
        os.set_blocking(self.proc.stdin.fileno(), False)
        try:
            first = self._read_line(time.monotonic() + START_S)
        except SandboxDied as exc:
            said = self.buffer.decode("utf-8", "replace").strip()[-1_000:]
            self.close()
            raise SandboxUnavailable(
                f"the grading sandbox (bwrap) did not start: {exc.reason}; it said: {said!r}"
            ) from None
        if first.get("started") is not True:
            self.close()
            raise SandboxUnavailable(f"the grading sandbox said {first!r} when starting")

    def ask(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Send `request` and return the answer; SandboxDied when there is none within
        `timeout_s` (then the sandbox is killed) or the sandbox ended."""
        deadline = time.monotonic() + timeout_s
        data = json.dumps(request, default=str).encode() + b"\n"
        self._write(data, deadline)
        return self._read_line(deadline)

    def close(self) -> None:
        """End the harness: its requests end, so it exits (killed if it has not in
        CLOSE_S: the code left a thread running, say)."""
        self.selector.close()
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(CLOSE_S)
        stop(self.proc)

    def _die(self, killed_for: str | None) -> SandboxDied:
        returncode = stop(self.proc) if killed_for else self._returncode()
        return SandboxDied(_died(returncode, killed_for))

    def _returncode(self) -> int | None:
        try:
            return self.proc.wait(GRACE_S)
        except subprocess.TimeoutExpired:
            stop(self.proc)
            return None

    def _write(self, data: bytes, deadline: float) -> None:
        fd, view = self.proc.stdin.fileno(), memoryview(data)
        while view:
            try:
                sent = os.write(fd, view)
            except BlockingIOError:
                sent = 0
            except OSError:  # a broken pipe: it ended
                raise self._die(None) from None
            view = view[sent:]
            if view and not self._wait(fd, selectors.EVENT_WRITE, deadline):
                raise self._die("killed: it stopped reading its requests")

    def _read_line(self, deadline: float) -> dict[str, Any]:
        fd = self.proc.stdout.fileno()
        while (end := self.buffer.find(b"\n")) < 0:
            if len(self.buffer) > MAX_LINE:
                raise self._die("killed: its answer was too long")
            if not self._wait(fd, selectors.EVENT_READ, deadline):
                raise self._die("killed: it ran past its time limit")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise self._die(None)
            self.buffer += chunk
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 1]
        try:
            answer = json.loads(line)
        except ValueError:
            raise self._die("killed: it wrote something that is not an answer") from None
        if not isinstance(answer, dict):
            raise self._die("killed: it wrote something that is not an answer")
        return answer

    def _wait(self, fd: int, event: int, deadline: float) -> bool:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        self.selector.register(fd, event)
        try:
            return bool(self.selector.select(left))
        finally:
            self.selector.unregister(fd)


@dataclass(frozen=True)
class Died:
    """An item whose sandbox died under it, alone too: why."""

    reason: str


def run_items(
    items: Sequence[Any],
    open_session: Callable[[], SandboxSession],
    ask: Callable[[SandboxSession, Any], dict[str, Any]],
) -> list[dict[str, Any] | Died]:
    """Each item's answer, asking one sandbox for one item after another. When the sandbox
    dies at an item, that item is asked again alone in a fresh sandbox (was it the item, or
    what came before it?), and the rest go on in another."""
    answers: list[dict[str, Any] | Died] = []
    todo = list(items)
    while todo:
        reason, first = None, True
        with _session(open_session) as session:
            while todo:
                try:
                    answers.append(ask(session, todo[0]))
                except SandboxDied as exc:
                    reason = exc.reason
                    break
                todo.pop(0)
                first = False
        if reason is None:
            break
        guilty = todo.pop(0)
        if not first:  # others went before it in that sandbox: was it them?
            with _session(open_session) as session:
                try:
                    answers.append(ask(session, guilty))
                    continue
                except SandboxDied as exc:
                    reason = exc.reason
        answers.append(Died(reason))
    return answers


@contextlib.contextmanager
def _session(open_session: Callable[[], SandboxSession]) -> Iterator[SandboxSession]:
    session = open_session()
    try:
        yield session
    finally:
        session.close()


def run_parallel(
    items: Sequence[Any],
    run: Callable[[Sequence[Any]], list[Any]],
    workers: int | None = None,
    min_per_sandbox: int = MIN_PER_SANDBOX,
) -> list[Any]:
    """run(chunk) over contiguous chunks of `items` in parallel, `workers` at once (default:
    the CPU count), each of at least `min_per_sandbox` items; the answers in the items' order."""
    if not items:
        return []
    workers = workers or os.cpu_count() or 1
    chunks = max(1, min(workers, len(items) // min_per_sandbox))
    if chunks == 1:
        return run(items)
    size = math.ceil(len(items) / chunks)
    parts = [items[i : i + size] for i in range(0, len(items), size)]
    with ThreadPoolExecutor(len(parts), thread_name_prefix="grading-sandbox") as pool:
        return [answer for answers in pool.map(run, parts) for answer in answers]
