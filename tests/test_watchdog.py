"""The step watchdog's interrupt (workers/watchdog.py), driven by hand in this thread: the
heartbeat's check sends SIGUSR1 to the main thread, whose handler raises StepTimeout there.

A phase's start time is moved into the past instead of waiting for it to run late, and the
signal is held back (pthread_sigmask) where a test needs it to land late.
"""

import contextlib
import dataclasses
import signal
import time

import pytest

from workers.watchdog import StepTimeout, Watchdog


@pytest.fixture
def watchdog():
    dog = Watchdog(limit_s=5.0)
    dog.arm()
    yield dog
    dog.disarm()


def run_late(dog: Watchdog, phase: str, step: int) -> None:
    """Enter `phase` as if it had begun long enough ago to be overdue."""
    dog.enter(phase, step)
    dog.current = dataclasses.replace(dog.current, since=time.monotonic() - 60)


def never(timeout: StepTimeout) -> None:
    raise AssertionError(f"the hard stop was chosen over the interrupt: {timeout}")


@contextlib.contextmanager
def signal_held():
    """SIGUSR1 waits while in the block and lands as it ends."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})


def test_an_overdue_phase_is_interrupted_with_its_name(watchdog):
    run_late(watchdog, "reward", 3)
    with pytest.raises(StepTimeout) as interrupted:
        watchdog.check(never)
    assert (interrupted.value.phase, interrupted.value.step) == ("reward", 3)


def test_a_phase_within_the_limit_is_left_alone(watchdog):
    watchdog.enter("learn", 1)
    watchdog.check(never)  # neither an interrupt nor the hard stop


def test_a_phase_that_ended_before_its_interrupt_landed_does_not_doom_the_next(watchdog):
    """A slow rollout is interrupted just as it finishes: the handler finds no overdue phase and
    the step goes on. A later phase that runs late gets an interrupt of its own, not the hard
    stop (which would end the whole worker process)."""
    run_late(watchdog, "rollout", 1)
    with signal_held():
        watchdog.check(never)  # the interrupt is sent ...
        watchdog.leave()  # ... and the rollout ends before it lands: nothing is raised
    run_late(watchdog, "reward", 1)
    with pytest.raises(StepTimeout) as interrupted:
        watchdog.check(never)
    assert interrupted.value.phase == "reward"
