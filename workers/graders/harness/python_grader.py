"""The `python` grader's harness: runs inside the grading sandbox (workers/graders/python.py
sends it as a script; the worker never imports it), on the sandbox's own interpreter.

It reads one JSON request a line on its stdin and answers each with one JSON line on its
stdout: first {"source", "timeout_s", "memory_mb"}, answered {"ready": true} once the source
is loaded (or {"error", "detail"} when it is not); then one {"sample", "item"} per grading,
answered {"reward": float} or {"error": "runtime" | "timeout", "detail": text}. The user's
code never sees those pipes: its stdin, stdout and stderr are /dev/null, and what it prints
is kept (the end of it) for the error's detail.
"""

import contextlib
import io
import json
import linecache
import math
import numbers
import os
import signal
import sys
import traceback

PID = os.getpid()
SOURCE_NAME = "grader.py"  # what tracebacks call the user's source
MAX_DETAIL = 4_000  # characters of an error's detail
MAX_PRINTED = 1_000  # characters of what the code printed, kept for the detail


class GradingTimeout(BaseException):
    """The time limit of one grading (a BaseException: `except Exception` lets it through)."""


class Sample(dict):
    """OpenAI's `sample`: a dict whose keys are also attributes (sample.output_text)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Printed(io.TextIOBase):
    """What the code prints: only its end is kept."""

    def __init__(self):
        self.text = ""

    def writable(self):
        return True

    def write(self, s):
        self.text = (self.text + str(s))[-MAX_PRINTED:]
        return len(s)


def _pipes():
    """The requests and answers pipes, moved out of the user's reach (0, 1, 2 -> /dev/null)."""
    requests = os.fdopen(os.dup(0), "rb")
    answers = os.fdopen(os.dup(1), "wb", buffering=0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    sys.stdin = open(os.devnull)  # noqa: SIM115
    return requests, answers


def _on_alarm(signum, frame):
    raise GradingTimeout


def _limited(timeout_s, printed, call, *args):
    """call(*args) with at most timeout_s of wall time, its prints going to `printed`."""
    sys.stdout = sys.stderr = printed
    signal.signal(signal.SIGALRM, _on_alarm)  # again: the code may have changed it
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            return call(*args)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        if os.getpid() != PID:  # a process the code forked came back here: it ends
            os._exit(0)
        sys.stdout = sys.stderr = Printed()
        _end_others()


def _end_others():
    """Kill whatever processes the code left running (all in this sandbox but its init and
    this one) and collect those that were ours."""
    with contextlib.suppress(OSError):
        os.kill(-1, signal.SIGKILL)
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def _failure(exc, printed, memory_mb):
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != SOURCE_NAME:
        tb = tb.tb_next  # from the user's first frame on
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    if isinstance(exc, MemoryError):
        text += f"(the memory limit is {memory_mb} MB of address space)\n"
    if printed:
        text = f"{text}printed before: {printed}"
    return {"error": "runtime", "detail": text[-MAX_DETAIL:]}


def _reward(value):
    try:
        if isinstance(value, numbers.Real):
            reward = float(value)
            if math.isfinite(reward):
                return {"reward": reward}
            return {"error": "runtime", "detail": f"grade returned {reward}, not a finite number"}
        shown = repr(value)[:200]
    except BaseException as exc:  # a Real whose float() or repr() fails
        shown = f"a value that failed ({type(exc).__name__})"
    return {
        "error": "runtime",
        "detail": f"grade returned {type(value).__name__} {shown}, not a number",
    }


def _load(request):
    """The user's grade function, or the answer that says why there is none."""
    source, timeout_s = request["source"], request["timeout_s"]
    linecache.cache[SOURCE_NAME] = (len(source), None, source.splitlines(True), SOURCE_NAME)
    namespace = {"__name__": "grader", "__file__": SOURCE_NAME}
    printed = Printed()
    try:
        code = compile(source, SOURCE_NAME, "exec")
        _limited(timeout_s, printed, exec, code, namespace)
    except GradingTimeout:
        detail = f"loading the source ran past the time limit of {timeout_s:g} s"
        return None, {"error": "timeout", "detail": detail}
    except BaseException as exc:
        return None, _failure(exc, printed.text, request["memory_mb"])
    grade = namespace.get("grade")
    if not callable(grade):
        return None, {"error": "runtime", "detail": "the source defines no function `grade`"}
    return grade, {"ready": True}


def _grade(grade, request, timeout_s, memory_mb):
    printed = Printed()
    try:
        value = _limited(timeout_s, printed, grade, Sample(request["sample"]), request["item"])
    except GradingTimeout:
        detail = f"grade ran past its time limit of {timeout_s:g} s"
        return {"error": "timeout", "detail": detail}
    except BaseException as exc:
        return _failure(exc, printed.text, memory_mb)
    return _reward(value)


def main():
    requests, answers = _pipes()

    def answer(obj):
        view = memoryview(json.dumps(obj).encode() + b"\n")
        while view:
            view = view[answers.write(view) :]

    answer({"started": True})
    first = json.loads(requests.readline())
    grade, said = _load(first)
    answer(said)
    if grade is None:
        return
    for line in requests:
        answer(_grade(grade, json.loads(line), first["timeout_s"], first["memory_mb"]))


main()
