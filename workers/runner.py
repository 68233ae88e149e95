"""`afif worker`: one RQ worker process that takes job ids from the afif queue.

We use RQ's SimpleWorker, which runs each job in the worker process itself, instead of
the default fork-per-job Worker: forking a process that has initialised torch (thread
pools, CUDA contexts) is unsafe, and keeping torch imported across jobs saves seconds
per job. The price is that a crash in a job takes the worker down with it; the
supervisor (`afif up`, or the container runtime) restarts the process and the reconciler
requeues the job, since it never reached a terminal status.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import socket
import threading
from typing import Any

from rq import SimpleWorker

from service.queue import get_connection, get_queue

logger = logging.getLogger(__name__)


_chosen_name: str | None = None

# Set once a cold shutdown (second SIGTERM/SIGINT) was requested. RQ raises SystemExit from
# its signal handler wherever the main thread happens to be; when that is inside a
# finalizer (a weakref callback during garbage collection) Python prints and drops the
# exception, and the job would run on. The running job's progress callback checks this
# flag and stops at its next call instead.
force_stop = threading.Event()


class AfifWorker(SimpleWorker):
    """RQ's SimpleWorker whose cold shutdown also raises `force_stop`."""

    def request_force_stop(self, signum: int, frame: Any) -> None:
        try:
            super().request_force_stop(signum, frame)
        except SystemExit:
            force_stop.set()
            raise


@functools.cache
def worker_name() -> str:
    """This process's worker name (`--name`, else host.pid.suffix: readable, and unique
    even when a restarted container reuses its hostname and pid; RQ refuses a live
    duplicate). Job rows record it."""
    return _chosen_name or f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(3)}"


def run_worker(name: str | None = None, burst: bool = False) -> int:
    """Work the queue until SIGTERM or, with `burst`, until it is empty.

    A first SIGTERM lets the current job finish; a second one stops it and hands the
    job back to the queue (see workers.tasks).

    Returns the process exit status.
    """
    global _chosen_name

    _chosen_name = name
    worker_name.cache_clear()
    connection = get_connection()
    queue = get_queue(connection)
    worker = AfifWorker([queue], connection=connection, name=worker_name())
    logger.info("worker %s listening on queue %s", worker.name, queue.name)

    # Import torch and the engine before the first job, so its latency is the job's own.
    import workers.tasks  # noqa: F401

    worker.work(burst=burst, with_scheduler=False, logging_level=None)
    return 0
