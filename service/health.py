"""Liveness and readiness: ready means the database answers and the broker accepts a connection."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from service.config import Settings
from service.db import get_engine
from service.deps import SettingsDep
from service.dispatch import broker_reachable

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


def readiness(settings: Settings) -> dict[str, str]:
    """Each dependency's check: "ok" or what went wrong."""
    checks = {"database": "ok", "broker": "ok"}
    try:
        with get_engine(settings.resolved_database_url).connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # readiness reports any failure instead of raising it
        checks["database"] = f"error: {exc.__class__.__name__}: {exc}"
    if not broker_reachable(settings):
        checks["broker"] = "error: cannot connect"
    return checks


@router.get("/readyz")
def readyz(settings: SettingsDep) -> JSONResponse:
    checks = readiness(settings)
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)
