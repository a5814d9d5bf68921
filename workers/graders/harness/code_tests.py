"""The `code_tests` grader's harness: runs inside the grading sandbox (workers/graders/
code_tests.py sends it as a script; the worker never imports it), on the sandbox's own
interpreter.

A fork server: it reads one JSON request a line on its stdin, {"program", "mode", "input",
"fn_name", "timeout_s", "memory_mb"}, runs that one test in a fresh child process, and answers
one JSON line on its stdout: {"status": "exit" | "signal" | "timeout", "code", "signal",
"stdout", "stdout_cut", "stderr", "result", "elapsed_s"}. It never sees an expected output:
the worker compares. Modes: "stdio" runs the program as __main__ with `input` (text) as its
stdin; "call" loads it and calls `fn_name` (a function, or a method of `class Solution`) with
the arguments `input` and writes the JSON of what it returned; "assert" loads it and runs the
statements `input`, and says "passed" when they ran through. The child has its own session,
time (wall and CPU) and address-space limits; whatever it leaves running is killed before the
next test.
"""

import contextlib
import ctypes
import json
import math
import os
import resource
import selectors
import signal
import sys
import time
import traceback

MB = 1024 * 1024
MAX_STDOUT = 8 * MB  # bytes of a test's stdout kept (past it: "stdout_cut")
MAX_RESULT = 8 * MB  # bytes of a call's JSON result kept
MAX_STDERR = 2_000  # bytes of the end of its stderr kept
RESULT_FD = 3  # where the child writes a call's result, or an assert's "passed"
PASSED = b"passed"
PR_SET_DUMPABLE = 4


def _dumpable(flag):
    """Whether other processes of the sandbox's user may open this one's /proc files (its
    pipes among them) or trace it: never the server's, always a test's (/dev/stdin)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, int(flag), 0, 0, 0)


def _pipes():
    """The requests and answers pipes, moved away from 0, 1, 2 (-> /dev/null)."""
    requests = os.fdopen(os.dup(0), "rb")
    answers = os.fdopen(os.dup(1), "wb", buffering=0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    return requests, answers


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _function(namespace, name):
    solution = namespace.get("Solution")
    if isinstance(solution, type) and hasattr(solution, name):
        return getattr(solution(), name)  # LeetCode style, as TACO has it
    return namespace[name]


def _run(request):
    """The test, in the child: its exit status."""
    mode = request["mode"]
    code = compile(request["program"], "solution.py", "exec")
    namespace = {"__name__": "__main__" if mode == "stdio" else "solution"}
    try:
        exec(code, namespace)
        if mode == "call":
            args = request["input"]
            value = _function(namespace, request["fn_name"])(*args)
            try:
                data = json.dumps(value).encode()
            except (TypeError, ValueError) as exc:
                print(f"returned {type(value).__name__}, which is not JSON: {exc}", file=sys.stderr)
                return 1
            _write_all(RESULT_FD, data)
        elif mode == "assert":
            exec(compile(request["input"], "test.py", "exec"), namespace)
            _write_all(RESULT_FD, PASSED)
    except SystemExit as exc:
        if mode != "stdio" or exc.code is None:
            return 0
        if isinstance(exc.code, int):
            return exc.code & 0xFF
        print(exc.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def _child(request, stdin_fd, out_w, err_w, res_w):
    status = 70
    try:
        os.setsid()  # one process group to kill
        _dumpable(True)
        memory = request["memory_mb"] * MB
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        cpu = math.ceil(request["timeout_s"]) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        for fd, target in ((stdin_fd, 0), (out_w, 1), (err_w, 2), (res_w, RESULT_FD)):
            os.dup2(fd, target)
        os.closerange(RESULT_FD + 1, 1 << 16)  # the requests and answers pipes among them
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        status = _run(request)
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    finally:
        os._exit(status)


class _Stream:
    def __init__(self, cap, keep_end=False):
        self.cap, self.keep_end, self.data, self.cut = cap, keep_end, bytearray(), False

    def add(self, chunk):
        self.data += chunk
        if len(self.data) > self.cap:
            self.cut = True
            if self.keep_end:
                del self.data[: len(self.data) - self.cap]
            else:
                del self.data[self.cap :]

    def text(self):
        return self.data.decode("utf-8", "replace")


def _collect(pid, streams, deadline):
    """Read the child's pipes until it has ended and they are drained, or the deadline;
    whether it ended. (Pipes that its leftover processes hold open are not waited for.)"""
    pidfd = os.pidfd_open(pid)
    ended = False
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(pidfd, selectors.EVENT_READ)
            for fd in streams:
                os.set_blocking(fd, False)
                sel.register(fd, selectors.EVENT_READ)
            while sel.get_map():
                left = deadline - time.monotonic()
                if not ended and left <= 0:
                    break
                events = sel.select(0 if ended else left)
                if ended and (not events or left < -1):
                    break
                for key, _ in events:
                    if key.fd == pidfd:
                        ended = True
                        sel.unregister(pidfd)
                        continue
                    chunk = os.read(key.fd, 1 << 16)
                    if chunk:
                        streams[key.fd].add(chunk)
                    else:
                        sel.unregister(key.fd)
    finally:
        os.close(pidfd)
    return ended


def _end_all():
    """Kill every process of the sandbox but its init and this one, and collect ours."""
    with contextlib.suppress(OSError):
        os.kill(-1, signal.SIGKILL)
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def _test(request):
    stdin_fd = os.memfd_create("stdin")
    if request["mode"] == "stdio":
        _write_all(stdin_fd, request["input"].encode())
        os.lseek(stdin_fd, 0, os.SEEK_SET)
    (out_r, out_w), (err_r, err_w), (res_r, res_w) = os.pipe(), os.pipe(), os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(request, stdin_fd, out_w, err_w, res_w)
    for fd in (stdin_fd, out_w, err_w, res_w):
        os.close(fd)
    stdout, stderr, result = _Stream(MAX_STDOUT), _Stream(MAX_STDERR, True), _Stream(MAX_RESULT)
    deadline = started + request["timeout_s"]
    timed_out = not _collect(pid, {out_r: stdout, err_r: stderr, res_r: result}, deadline)
    if timed_out:
        for kill in (os.killpg, os.kill):
            with contextlib.suppress(OSError):
                kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    elapsed = time.monotonic() - started
    _end_all()
    for fd in (out_r, err_r, res_r):
        os.close(fd)
    return {
        "status": "timeout" if timed_out else "signal" if os.WIFSIGNALED(status) else "exit",
        "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "stdout": stdout.text()[:200] if stdout.cut else stdout.text(),  # cut: it failed
        "stdout_cut": stdout.cut,
        "stderr": stderr.text(),
        "result": None if result.cut or not result.data else result.text(),
        "elapsed_s": round(elapsed, 4),
    }


def main():
    _dumpable(False)
    requests, answers = _pipes()
    _write_all(answers.fileno(), b'{"started": true}\n')
    for line in requests:
        _write_all(answers.fileno(), json.dumps(_test(json.loads(line))).encode() + b"\n")


main()
