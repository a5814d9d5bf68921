"""The step watchdog: a phase of a step (rollout, reward, learn, checkpoint) that runs longer than
`resources.step_timeout_s` fails the run with an event naming the phase, instead of hanging.

The run loop marks each phase; the heartbeat thread checks the clock. When a phase is overdue
the watchdog sends SIGUSR1 to the main thread, whose handler raises StepTimeout there: a
blocking socket read is interrupted and the run fails through the normal path. Code stuck
inside a C call never returns to Python to see the signal, so after a grace period the watchdog
records the failure itself and ends the process (Celery starts a fresh pool child).
"""

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

GRACE_S = 30.0


class StepTimeout(Exception):
    def __init__(self, phase: str, step: int, limit_s: float) -> None:
        super().__init__(
            f"step {step} made no progress for {limit_s:g} s in the {phase} phase "
            "(resources.step_timeout_s)"
        )
        self.phase, self.step = phase, step


@dataclass(frozen=True)
class _Phase:
    name: str
    step: int
    since: float  # time.monotonic() when it began


class Watchdog:
    """The phase a step is in. It is one immutable value, replaced whole, so the heartbeat thread
    and the signal handler read it consistently without a lock (a handler that waited for a
    lock the interrupted thread holds would never return)."""

    def __init__(self, limit_s: float | None) -> None:
        self.limit_s = limit_s
        self.current: _Phase | None = None
        # The phase an interrupt was sent for, and when: each phase gets its own interrupt, so
        # one that ended before its interrupt landed does not doom the next to the hard stop.
        self.fired: _Phase | None = None
        self.fired_at = 0.0
        self.interruptible = False

    def arm(self) -> None:
        """Install the SIGUSR1 handler (main thread only; elsewhere only the hard stop works)."""
        if self.limit_s is None or threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGUSR1, self._raise)
        self.interruptible = True

    def disarm(self) -> None:
        if self.interruptible:
            signal.signal(signal.SIGUSR1, signal.SIG_DFL)
            self.interruptible = False

    def enter(self, phase: str, step: int) -> None:
        self.current = _Phase(phase, step, time.monotonic())

    def leave(self) -> None:
        self.current = None

    def overdue(self, phase: "_Phase | None" = None) -> StepTimeout | None:
        """The timeout of `phase` (default: the current one) if it has run past the limit."""
        phase = phase or self.current
        if self.limit_s is None or phase is None:
            return None
        if time.monotonic() - phase.since <= self.limit_s:
            return None
        return StepTimeout(phase.name, phase.step, self.limit_s)

    def check(self, fail_run: Callable[[StepTimeout], None]) -> None:
        """Called by the heartbeat thread: interrupt an overdue phase; end the process if the
        interrupt did not get through within GRACE_S."""
        phase = self.current
        timeout = self.overdue(phase)
        if timeout is None:
            return
        now = time.monotonic()
        if self.interruptible and self.fired is not phase:
            self.fired, self.fired_at = phase, now
            signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
        elif not self.interruptible or now - self.fired_at > GRACE_S:
            fail_run(timeout)
            os._exit(1)

    def _raise(self, signum, frame) -> None:
        timeout = self.overdue()
        if timeout is not None:
            raise timeout
