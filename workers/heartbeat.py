"""The run's heartbeat: a thread that renews the lease and lets the step watchdog look at the
clock; the lead process of a run (and the task supervising a multi-process one) runs one."""

import logging
import threading

from workers.records import RunRecorder
from workers.watchdog import StepTimeout, Watchdog

log = logging.getLogger(__name__)


class Heartbeat(threading.Thread):
    """Renews the run's lease and lets the watchdog look at the clock, every `every_s`."""

    def __init__(self, recorder: RunRecorder, every_s: float, watchdog: Watchdog) -> None:
        super().__init__(name="gvpo-heartbeat", daemon=True)
        self.recorder, self.every_s, self.watchdog = recorder, every_s, watchdog
        self.stopped, self.lost = threading.Event(), threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every_s):
            self.watchdog.check(self._fail)
            try:
                if not self.recorder.renew_lease():
                    self.lost.set()
                    return
            except Exception:  # a transient database error must not kill the run
                log.exception("lease renewal failed; retrying")

    def _fail(self, timeout: StepTimeout) -> None:
        record_timeout(self.recorder, timeout)


def record_timeout(recorder: RunRecorder, timeout: StepTimeout) -> None:
    recorder.fail(str(timeout), {"phase": timeout.phase, "step": timeout.step})
