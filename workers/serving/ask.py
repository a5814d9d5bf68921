"""Asking the inference workers (`gvpo serve`) to serve a model, from a training worker: a judge
of our own (workers/graders/served.py) and rollouts on inference workers
(workers/rollout/inference.py). The API asks them the same way (service/serving/routing.py),
by the rules of service/contract/serving.py.
"""

import httpx

from service.config import Settings
from service.contract.serving import (
    NO_WORKER,
    EnsureModel,
    Held,
    Refusal,
    by_preference,
    ensure_outcome,
)
from service.db import session_scope
from service.models.inference_worker import live_workers


def ensure_served(
    client: httpx.Client, settings: Settings, wanted: EnsureModel, timeout: httpx.Timeout
) -> Held | Refusal:
    """The live inference workers asked in order of preference to serve `wanted`: the first
    that holds it (Held), else a refusal that no other worker can help with (its files are
    gone, or it does not load), else "no_room" with why nobody took it."""
    with session_scope(settings.resolved_database_url) as session:
        workers = live_workers(session, settings.serve_stale_s)
    refusal = Refusal("no_room", NO_WORKER)
    for worker in by_preference(workers, wanted.model):
        try:
            answer = client.post(f"{worker.url}/models", json=wanted.model_dump(), timeout=timeout)
        except httpx.TransportError as exc:
            refusal = Refusal(
                "no_room", f"the inference worker at {worker.url} did not answer ({exc!r})"
            )
            continue
        try:
            body = answer.json()
        except ValueError:
            body = None
        outcome = ensure_outcome(answer.status_code, body)
        if isinstance(outcome, Held) or outcome.kind != "no_room":
            return outcome
        refusal = outcome  # another worker may have room
    return refusal


def holders(settings: Settings, model: str) -> list[str]:
    """The control addresses of the live inference workers that hold `model`."""
    with session_scope(settings.resolved_database_url) as session:
        workers = live_workers(session, settings.serve_stale_s)
    return [w.url for w in workers if model in w.holds]
