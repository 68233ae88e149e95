"""Liveness and readiness probes."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    """The database and Redis are reachable (503 naming what is not)."""
    checks: dict[str, str] = {}
    try:
        with request.app.state.sessions() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        logger.warning("readiness: database unreachable: %s", exc)
        checks["database"] = "unreachable"
    try:
        checks["redis"] = "ok" if request.app.state.redis_ping() else "unreachable"
    except Exception as exc:
        logger.warning("readiness: redis check failed: %s", exc)
        checks["redis"] = "unreachable"

    ready = all(v == "ok" for v in checks.values())
    body = {"status": "ready" if ready else "unavailable", "checks": checks}
    if ready:
        return JSONResponse(body)
    down = ", ".join(k for k, v in checks.items() if v != "ok")
    return JSONResponse(
        {"type": "about:blank", "title": "Service unavailable", "status": 503,
         "detail": f"unreachable: {down}", **body},
        status_code=503,
        media_type="application/problem+json",
    )
