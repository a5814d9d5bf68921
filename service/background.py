"""The API process's background passes (the reaper, the scheduler, the notifier): each a thread
that makes one pass every so often until the process stops, so that a slow one (a notification
receiver that takes its time) never delays the others."""

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Every(threading.Thread):
    """Calls `work()` every `interval_s` seconds until `stopped` is set. A pass that fails (a
    database or broker outage) is logged, and the next one tries again."""

    def __init__(
        self, name: str, interval_s: float, work: Callable[[], object], stopped: threading.Event
    ) -> None:
        super().__init__(name=f"gvpo-{name}", daemon=True)
        self.interval_s, self.work, self.stopped = interval_s, work, stopped

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                self.work()
            except Exception:
                log.exception("%s pass failed", self.name)
