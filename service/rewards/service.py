"""Async reward callbacks and webhook secrets.

A callback is authenticated by the run's webhook signature, not an API key. It may carry all or
part of a request's rewards; rewards already stored must be repeated identically (a duplicate is
accepted once), and any disagreement is refused as a whole (409) so nothing changes.
"""

from datetime import timedelta

from pydantic_core import from_json
from sqlalchemy import and_, bindparam, select, update
from sqlalchemy.orm import Session

from gvpo_client.signing import SignatureError, is_reward, new_secret, verify
from service.config import Settings
from service.contract.events import EventType
from service.contract.limits import MAX_ITEMS_PER_REQUEST, MAX_WEBHOOK_ID
from service.contract.sealing import Sealer, SealingError
from service.db import AFRESH, Steps, run_steps
from service.errors import BadRequest, Conflict, NotFound, ServiceUnavailable, Unauthorized
from service.models import Project, RewardRequest, Run
from service.models.base import utcnow
from service.models.run_event import add_event
from service.runs.service import get_run


def accepted_secrets(sealer: Sealer, run) -> list[str]:
    """The secrets a callback may be signed with, in clear: the run's, and the one it replaced
    during the rotation's grace period. `run`: a Run, or a row of its secret columns and id."""
    stored = [run.webhook_secret_encrypted]
    if (
        run.previous_webhook_secret_encrypted
        and run.previous_secret_expires_at
        and run.previous_secret_expires_at > utcnow()
    ):
        stored.append(run.previous_webhook_secret_encrypted)
    try:
        return [sealer.open(s) for s in stored]
    except SealingError as exc:  # the server's configuration, not the caller's fault
        raise ServiceUnavailable(f"run {run.id}'s webhook secret cannot be read: {exc}") from None


def _parse(raw: bytes) -> tuple[str, list[tuple[str, float]]]:
    try:
        # pydantic's parser, as FastAPI's request bodies: it also refuses what is no text (an
        # escaped lone surrogate, which json.loads accepts and no database can store)
        body = from_json(raw)
    except ValueError as exc:  # not JSON, not UTF-8, past a number's range or nesting's limit
        if "recursion limit" in str(exc):
            raise BadRequest("body is not JSON a callback could be: it nests too deeply") from None
        raise BadRequest(f"body is not JSON: {exc}") from None
    if (
        not isinstance(body, dict)
        or not isinstance(body.get("request_id"), str)
        or not isinstance(body.get("rewards"), list)
    ):
        raise BadRequest('expected {"request_id": "...", "rewards": [{"sample_id", "reward"}]}')
    if len(body["request_id"]) > MAX_WEBHOOK_ID:
        raise BadRequest(f"request_id is longer than any request's ({MAX_WEBHOOK_ID} characters)")
    if len(body["rewards"]) > MAX_ITEMS_PER_REQUEST:
        raise BadRequest(
            f"{len(body['rewards'])} rewards: a callback carries at most a request's items "
            f"({MAX_ITEMS_PER_REQUEST})"
        )
    pairs = []
    for n, row in enumerate(body["rewards"]):
        sid = row.get("sample_id") if isinstance(row, dict) else None
        value = row.get("reward") if isinstance(row, dict) else None
        if not isinstance(sid, str) or len(sid) > MAX_WEBHOOK_ID:
            raise BadRequest(
                f"rewards[{n}] has no sample_id (a string of at most {MAX_WEBHOOK_ID} characters)",
                {"index": n},
            )
        if not is_reward(value):
            raise BadRequest(
                f"rewards[{n}] ({sid}): reward must be a finite number, got {value!r}",
                {"sample_id": sid},
            )
        pairs.append((sid, float(value)))
    return body["request_id"], pairs


MERGE_ATTEMPTS = 50


class _LostRace(Exception):
    """Another callback's write moved the request's version since this one read it."""


def accept_callback(
    session: Session, settings: Settings, run_id: str, raw: bytes, signature: str | None
) -> dict:
    """Verify and merge one callback, in `session`."""
    return run_steps(session, callback_steps(settings, run_id, raw, signature))


def callback_steps(
    settings: Settings, run_id: str, raw: bytes, signature: str | None
) -> Steps[dict]:
    """Verify and merge one callback, as the statements it runs (service.db's Steps: in a
    session, or on the API's event loop). Concurrent callbacks for the same request are merged
    one at a time: a write that lost the race (the request's version moved) is dropped and the
    callback merged again on top of the winner's rewards."""
    for _ in range(MERGE_ATTEMPTS - 1):
        try:
            return (yield from _merge_callback(settings, run_id, raw, signature))
        except _LostRace:
            yield AFRESH
    return (yield from _merge_callback(settings, run_id, raw, signature))


# The statements of a callback, built once (building one costs more than running it), of the
# tables' columns (plain SQL: no ORM object is loaded, nor an ORM statement compiled): the run's
# webhook secrets and, when the callback's request is one of the run's, that request's sample
# ids, rewards and version (None: no such request). A callback needs none of the run's spec.
_runs, _requests = Run.__table__, RewardRequest.__table__
_READ = (
    select(
        _runs.c.id,
        _runs.c.webhook_secret_encrypted,
        _runs.c.previous_webhook_secret_encrypted,
        _runs.c.previous_secret_expires_at,
        _requests.c.sample_ids,
        _requests.c.rewards,
        _requests.c.version,
    )
    .select_from(
        _runs.outerjoin(
            _requests,
            and_(_requests.c.id == bindparam("request_id"), _requests.c.run_id == _runs.c.id),
        )
    )
    .where(_runs.c.id == bindparam("run_id"))
)
# Written only over the version read (optimistic concurrency, as the ORM's version check): a
# concurrent callback that wrote first makes this one read and merge again.
_WRITE = (
    _requests.update()
    .where(_requests.c.id == bindparam("request_id"), _requests.c.version == bindparam("seen"))
    .values(
        rewards=bindparam("merged", type_=_requests.c.rewards.type),
        version=bindparam("seen") + 1,
    )
)
_COMPLETE = _WRITE.values(completed_at=bindparam("now", type_=_requests.c.completed_at.type))


def _merge_callback(
    settings: Settings, run_id: str, raw: bytes, signature: str | None
) -> Steps[dict]:
    # The body names the request to read with the run; what is wrong with it is said only once
    # the signature is known to be good (401 before 400).
    try:
        request_id, pairs = _parse(raw)
        problem = None
    except BadRequest as exc:
        request_id, pairs, problem = None, [], exc
    rows = yield _READ, {"run_id": run_id, "request_id": request_id or ""}
    if not rows:
        raise NotFound(f"no run {run_id!r}")
    row = rows[0]
    try:
        verify(accepted_secrets(settings.sealer, row), signature, raw)
    except SignatureError as exc:
        raise Unauthorized(f"bad webhook signature: {exc}") from None
    if problem is not None:
        raise problem
    if row.version is None:
        raise BadRequest(f"unknown request_id {request_id!r} for run {run_id}")
    known, stored, new = set(row.sample_ids), dict(row.rewards), {}
    for sid, value in pairs:
        if sid not in known:
            raise BadRequest(
                f"unknown sample_id {sid!r} in request {request_id}", {"sample_id": sid}
            )
        previous = stored.get(sid, new.get(sid))
        if previous is not None and previous != value:
            raise Conflict(
                f"sample {sid} already has reward {previous}; got {value}", {"sample_id": sid}
            )
        if sid not in stored:
            new[sid] = value
    rewards = {**stored, **new}
    complete = len(rewards) == len(known)
    if new:
        params = {"request_id": request_id, "seen": row.version, "merged": rewards}
        if complete:
            params["now"] = utcnow()
        if (yield _COMPLETE if complete else _WRITE, params) != 1:
            raise _LostRace(request_id)
    return {"request_id": request_id, "accepted": len(new), "complete": complete}


def rotate_secret(session: Session, settings: Settings, project: Project, run_id: str) -> dict:
    run = get_run(session, project, run_id)
    expires = utcnow() + timedelta(seconds=settings.webhook_secret_grace_s)
    secret = new_secret()
    run.previous_webhook_secret_encrypted = run.webhook_secret_encrypted
    run.previous_secret_expires_at = expires
    run.webhook_secret_encrypted = settings.sealer.seal(secret)
    add_event(
        session,
        run.id,
        EventType.WEBHOOK_SECRET_ROTATED,
        f"webhook secret rotated; the previous one is accepted until {expires.isoformat()}",
    )
    session.flush()
    return {
        "run_id": run.id,
        "webhook_secret": secret,
        "previous_secret_expires_at": expires,
    }


def reencrypt_secrets(session: Session, sealer: Sealer) -> int:
    """Re-encrypt every stored webhook secret under the newest key (the end of a key rotation:
    the older keys can then be dropped); how many runs were rewritten. Each row is written only
    if its secrets did not change meanwhile (a webhook secret rotation sealed them anew)."""
    rows = session.execute(
        select(Run.id, Run.webhook_secret_encrypted, Run.previous_webhook_secret_encrypted)
    ).all()
    done = 0
    for run_id, current, previous in rows:
        done += session.execute(
            update(Run)
            .where(
                Run.id == run_id,
                Run.webhook_secret_encrypted == current,
                Run.previous_webhook_secret_encrypted.is_(None)
                if previous is None
                else Run.previous_webhook_secret_encrypted == previous,
            )
            .values(
                webhook_secret_encrypted=sealer.reseal(current),
                previous_webhook_secret_encrypted=previous and sealer.reseal(previous),
            )
            .execution_options(synchronize_session=False)
        ).rowcount
    return done
