"""Projects and API keys. Keys are shown once at creation; only a hash is stored: an
HMAC-SHA256 keyed with the server's pepper (GVPO_API_KEY_PEPPER), so a copy of the database
alone does not allow checking guesses offline. The embedded stack, which has no pepper,
stores a plain SHA-256.
"""

import hashlib
import hmac
import secrets

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from service.errors import NotFound, Unauthorized
from service.models import ApiKey, Project
from service.models.base import utcnow

KEY_PREFIX = "gvpo_sk_"


def _hash(key: str, pepper: str | None) -> str:
    if pepper:
        return hmac.new(pepper.encode(), key.encode(), hashlib.sha256).hexdigest()
    return hashlib.sha256(key.encode()).hexdigest()


def get_or_create_project(session: Session, name: str) -> Project:
    project = session.scalar(select(Project).where(Project.name == name))
    if project is None:
        project = Project(name=name)
        session.add(project)
        session.flush()
    return project


def create_api_key(
    session: Session, project_name: str, pepper: str | None = None
) -> tuple[Project, str]:
    """Make a key for the project (created if new); returns the plaintext key, never stored."""
    project = get_or_create_project(session, project_name)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(project_id=project.id, key_hash=_hash(key, pepper), prefix=key[:16]))
    session.flush()
    return project, key


def list_api_keys(session: Session, project_name: str | None = None) -> list[tuple[ApiKey, str]]:
    """Every key (of one project when named), oldest first, with its project's name."""
    query = (
        select(ApiKey, Project.name)
        .join(Project, Project.id == ApiKey.project_id)
        .order_by(ApiKey.created_at, ApiKey.id)
    )
    if project_name is not None:
        if session.scalar(select(Project.id).where(Project.name == project_name)) is None:
            raise NotFound(f"no project named {project_name!r}")
        query = query.where(Project.name == project_name)
    return [(key, name) for key, name in session.execute(query).all()]


def revoke_api_key(session: Session, key_id: str) -> tuple[ApiKey, bool]:
    """Refuse the key from now on; (the key, whether this call revoked it: False if it already
    was)."""
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFound(f"no API key {key_id!r} (`gvpo api-key list` shows their ids)")
    if key.revoked_at is not None:
        return key, False
    key.revoked_at = utcnow()
    session.flush()
    return key, True


# The project of an unrevoked key, by the key's hash: one query, built once (every request
# with an API key runs it).
_KEY_PROJECT = (
    select(Project)
    .join(ApiKey, ApiKey.project_id == Project.id)
    .where(ApiKey.key_hash == bindparam("key_hash"), ApiKey.revoked_at.is_(None))
)


def authenticate(session: Session, authorization: str | None, pepper: str | None = None) -> Project:
    if not authorization:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("malformed Authorization header: expected 'Bearer <key>'")
    project = session.scalar(_KEY_PROJECT, {"key_hash": _hash(key.strip(), pepper)})
    if project is None:
        raise Unauthorized("invalid API key")
    return project
