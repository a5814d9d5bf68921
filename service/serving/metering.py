"""Inference usage: what the OpenAI-compatible endpoints relayed for each project's models, as
the inference servers counted it (each answer's `usage`). Counted in memory per API process and
added to the database every few seconds (one additive upsert per project, run and day), so that
an answer costs no write of its own; what a process counted in its last seconds before it was
killed is lost.

A streamed answer's usage comes in its last chunk only when the request asks for it
(`stream_options.include_usage`): the relay always asks, and drops that chunk again for a client
that did not."""

import threading
from collections import Counter
from datetime import date

from service.db import session_scope
from service.models import InferenceUsage
from service.models.base import upsert, utcnow

FIELDS = ("requests", "prompt_tokens", "completion_tokens")
METER_FLUSH_S = 2.0  # how often each API process adds what it counted


class Meter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str, date], Counter] = {}

    def add(self, project_id: str, run_id: str, usage: object) -> None:
        """Count one answer with OpenAI's `usage` object (anything else counts the request
        alone)."""
        counts = Counter(requests=1)
        if isinstance(usage, dict):
            for name in ("prompt_tokens", "completion_tokens"):
                if isinstance(value := usage.get(name), int) and value >= 0:
                    counts[name] += value
        with self._lock:
            self._counts.setdefault((project_id, run_id, utcnow().date()), Counter()).update(counts)

    def flush(self, url: str) -> None:
        """Add what was counted since the last flush to the database; kept for the next one
        when the database cannot be reached."""
        with self._lock:
            counts, self._counts = self._counts, {}
        if not counts:
            return
        rows = [
            {
                "project_id": project,
                "run_id": run,
                "day": day,
                **{name: counted[name] for name in FIELDS},
            }
            for (project, run, day), counted in counts.items()
        ]
        try:
            with session_scope(url) as session:
                keys = ["project_id", "run_id", "day"]
                upsert(session, InferenceUsage, rows, keys, list(FIELDS), add=True)
        except Exception:
            with self._lock:  # counted again next time, with what came meanwhile
                for key, counted in counts.items():
                    self._counts.setdefault(key, Counter()).update(counted)
            raise
