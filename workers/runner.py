"""`afif worker`: one RQ worker process that takes job ids from the afif queue.

We use RQ's SimpleWorker, which runs each job in the worker process itself, instead of
the default fork-per-job Worker: forking a process that has initialised torch (thread
pools, CUDA contexts) is unsafe, and keeping torch imported across jobs saves seconds
per job. The price is that a crash in a job takes the worker down with it; the
supervisor (`afif up`, or the container runtime) restarts the process and the reconciler
requeues the job, since it never reached a terminal status.
"""

from __future__ import annotations

import logging
import os
import socket

from rq import SimpleWorker

from service.queue import get_connection, get_queue

logger = logging.getLogger(__name__)


def worker_name() -> str:
    """A readable, unique-per-process worker name: host.pid."""
    return f"{socket.gethostname()}.{os.getpid()}"


def run_worker(name: str | None = None, burst: bool = False) -> int:
    """Work the queue until SIGTERM (finish the current job) or, with `burst`, until empty.

    Returns the process exit status.
    """
    connection = get_connection()
    queue = get_queue(connection)
    worker = SimpleWorker([queue], connection=connection, name=name or worker_name())
    logger.info("worker %s listening on queue %s", worker.name, queue.name)

    # Import torch and the engine before the first job, so its latency is the job's own.
    import workers.tasks  # noqa: F401

    worker.work(burst=burst, with_scheduler=False, logging_level=None)
    return 0
