"""The FastAPI application: `create_app()` wires settings, database, store, queue, routes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from models_store import LocalStore, Store
from service.db import session_factory
from service.errors import install_handlers
from service.routes import datasets, health, jobs, models
from service.settings import Settings, get_settings

logger = logging.getLogger(__name__)


def _default_enqueue(job_id: str) -> None:
    from service.queue import enqueue_job

    enqueue_job(job_id)


def _default_cancel(job_id: str) -> bool:
    from service.queue import cancel_in_queue

    return cancel_in_queue(job_id)


def _default_ping() -> bool:
    from service.queue import redis_ping

    return redis_ping()


def create_app(
    settings: Settings | None = None,
    *,
    store: Store | None = None,
    enqueue: Callable[[str], Any] | None = None,
    cancel_in_queue: Callable[[str], Any] | None = None,
    redis_ping: Callable[[], bool] | None = None,
) -> FastAPI:
    """Build the app; the queue functions are injectable (tests pass recorders)."""
    settings = settings or get_settings()
    app = FastAPI(
        title="afif",
        version="1",
        summary="Influence, fairness auditing, unlearning and approximate CV over HTTP.",
        description="Errors are RFC 9457 problem details (application/problem+json). "
        "Authenticate with `Authorization: Bearer <key>`.",
    )
    app.state.settings = settings
    app.state.sessions = session_factory(settings.database_url)
    app.state.store = store or LocalStore(settings.store_dir)
    app.state.enqueue = enqueue or _default_enqueue
    app.state.cancel_in_queue = cancel_in_queue or _default_cancel
    app.state.redis_ping = redis_ping or _default_ping

    install_handlers(app)
    for router in (health.router, models.router, datasets.router, jobs.router):
        app.include_router(router)
    logger.info("afif API ready (data dir %s)", settings.data_dir)
    return app
