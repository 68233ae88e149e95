"""The job id in every worker log line: a context variable and a filter that reads it."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

current_job_id: ContextVar[str | None] = ContextVar("afif_job_id", default=None)


class JobIdFilter(logging.Filter):
    """Prefixes a record's message with `[job <id>]` while a job runs in this context.

    Installed on handlers (not loggers) so that records of every library, RQ's and the
    engine's included, carry the id.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        job_id = current_job_id.get()
        record.job_id = job_id or "-"
        if job_id and not getattr(record, "_afif_tagged", False):
            record.msg = f"[job {job_id}] {record.msg}"
            record._afif_tagged = True
        return True


@contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Tag log lines emitted inside the block (and threads started with its context)."""
    token = current_job_id.set(job_id)
    try:
        yield
    finally:
        current_job_id.reset(token)
