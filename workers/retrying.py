"""Worker writes that wait out a database outage."""

import functools
import logging
import time

from sqlalchemy.exc import InterfaceError, OperationalError

log = logging.getLogger(__name__)


def retrying(method):
    """A RunRecorder method (self has settings and run_id) that waits out a database outage
    (connection refused or dropped, database locked) for up to settings.db_retry_s, with
    backoff. Each attempt is one whole transaction, so a write that failed half-way is rolled
    back and done again, never half-applied."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        deadline, delay = time.monotonic() + self.settings.db_retry_s, 0.25
        while True:
            try:
                return method(self, *args, **kwargs)
            except (OperationalError, InterfaceError) as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning(
                    "run %s: database unavailable in %s (%s); retrying in %.2f s",
                    self.run_id,
                    method.__name__,
                    exc.orig,
                    delay,
                )
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    return wrapper
