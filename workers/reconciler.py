"""The reconciler: nothing stays `queued` or `running` forever.

One pass (a) requeues or fails running jobs whose worker stopped beating (a worker
killed mid-job leaves its row `running` with an old heartbeat), and (b) enqueues
queued jobs that never reached Redis (the post-commit enqueue failed, or Redis lost
its data). A retried job redoes no finished step: results are written in one
transaction and a succeeded job is never claimed again.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import timedelta

import redis
from rq.exceptions import NoSuchJobError
from rq.job import Job as RqJob
from sqlalchemy import select

from service import queue
from service.db import session_scope
from service.domain import jobs as domain
from service.models import Job, utcnow
from service.settings import get_settings

logger = logging.getLogger(__name__)

# Seconds a queued row may be missing from Redis before we enqueue it again (at most
# AFIF_STALE_AFTER_SECONDS): the API commits the row first and enqueues right after.
GRACE_SECONDS = 30.0


@dataclass
class ReconcileSummary:
    """What one pass did, by job id."""

    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    enqueued: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.requeued or self.failed or self.enqueued)


def reconcile_once(
    stale_after_seconds: float | None = None, max_attempts: int | None = None
) -> ReconcileSummary:
    """One pass over lost and never-enqueued jobs; defaults come from settings."""
    settings = get_settings()
    stale_after = stale_after_seconds or settings.stale_after_seconds
    attempts = max_attempts or settings.max_attempts
    summary = ReconcileSummary()

    # Lost running jobs: the domain decides between another attempt and a final failure.
    # Limitation: a worker that is alive but silent for longer than stale_after (stopped
    # with SIGSTOP, or a heartbeat thread starved for a minute) has its job run a second
    # time elsewhere. The silent worker notices at its next beat and stops without
    # touching the row; if it completes first, the retry finds the job succeeded and its
    # own completion is a no-op. Results stay consistent; compute is wasted.
    with session_scope() as session:
        for job in domain.find_stale_jobs(session, stale_after):
            if domain.requeue_or_fail(session, job, attempts):
                summary.requeued.append(job.id)
            else:
                summary.failed.append(job.id)
                logger.warning(
                    "job %s given up (failed or cancelled) after %d attempt(s)",
                    job.id, job.attempts,
                )

    # Queued rows not on the queue: flagged ones (a failed enqueue, or the requeues just
    # above), and old ones Redis does not hold (it lost its data, or a worker died between
    # taking the id and claiming the row). The grace period keeps us from racing an API
    # process that has committed a row and is about to enqueue it.
    with session_scope() as session:
        flagged = [job.id for job in domain.find_unenqueued_jobs(session)]
        cutoff = utcnow() - timedelta(seconds=min(stale_after, GRACE_SECONDS))
        old = session.scalars(
            select(Job.id).where(Job.status == "queued", Job.created_at < cutoff)
        ).all()
    candidates = flagged + [job_id for job_id in old if job_id not in flagged]
    for job_id in candidates:
        if job_id not in flagged and _waiting_in_redis(job_id):
            continue
        try:
            queue.enqueue_job(job_id)
        except redis.RedisError:
            logger.warning("could not enqueue job %s; will retry", job_id, exc_info=True)
            continue
        with session_scope() as session:
            domain.mark_enqueued(session, job_id)
        if job_id not in summary.requeued:
            summary.enqueued.append(job_id)

    if summary:
        logger.info(
            "reconciled: requeued %s, failed %s, enqueued %s",
            summary.requeued, summary.failed, summary.enqueued,
        )
    return summary


def _waiting_in_redis(job_id: str) -> bool:
    """True if the job waits in RQ's queue. A job RQ calls `started` whose row is still
    `queued` long after creation was taken by a worker that died before claiming it."""
    try:
        rq_job = RqJob.fetch(queue.rq_job_id(job_id), connection=queue.get_connection())
    except NoSuchJobError:
        return False
    return rq_job.get_status(refresh=True) in ("queued", "deferred", "scheduled")


def reconcile_forever(interval: float = 10.0, stop: threading.Event | None = None) -> None:
    """Run `reconcile_once` every `interval` seconds until `stop` is set; errors are logged
    and the loop goes on (the database or Redis may be briefly away)."""
    stop = stop or threading.Event()
    logger.info("reconciler running every %.1f s", interval)
    while not stop.is_set():
        try:
            reconcile_once()
        except Exception:
            logger.exception("reconcile pass failed; retrying in %.1f s", interval)
        stop.wait(interval)
