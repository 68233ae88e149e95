"""service.queue against real Redis servers: the embedded one, shared by processes that
share AFIF_DATA_DIR, and the enqueue / cancel / ping operations the API relies on."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from service import queue
from service.settings import get_settings
from tests.integration.stack import REPO

pytestmark = pytest.mark.integration


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("AFIF_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("REDIS_URL", raising=False)
    get_settings.cache_clear()
    try:
        yield tmp_path
    finally:
        queue.shutdown_embedded()
        get_settings.cache_clear()


def test_embedded_redis_is_shared_through_the_data_dir(data_dir: Path) -> None:
    assert queue.redis_ping()
    queue.enqueue_job("job-1")

    # Another process with the same AFIF_DATA_DIR finds the same server and queue.
    probe = (
        "from service import queue; import sys; "
        "sys.stdout.write(','.join(queue.get_queue().job_ids))"
    )
    seen = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True,
        env={"AFIF_DATA_DIR": str(data_dir), "PATH": "/usr/bin:/bin"},
    ).stdout
    assert seen == queue.rq_job_id("job-1")


def test_enqueue_is_idempotent_and_cancel_drops_waiting_jobs(data_dir: Path) -> None:
    queue.enqueue_job("a")
    queue.enqueue_job("b")
    queue.enqueue_job("a")  # a retry replaces RQ's entry instead of adding a second one

    assert sorted(queue.get_queue().job_ids) == [queue.rq_job_id("a"), queue.rq_job_id("b")]
    assert queue.cancel_in_queue("a") is True
    assert queue.cancel_in_queue("a") is False
    assert queue.cancel_in_queue("never-enqueued") is False
    assert queue.get_queue().job_ids == [queue.rq_job_id("b")]


def test_unix_urls_and_an_unreachable_server(tmp_path: Path, data_dir: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    server = queue.EmbeddedRedis(tmp_path / "own")
    server.start()
    try:
        assert server.url.startswith("unix://")
        assert queue.connection_from_url(server.url).ping()
    finally:
        server.stop()
    assert server.process is not None and server.process.returncode is not None

    monkeypatch.setenv("REDIS_URL", server.url)  # the server is gone now
    get_settings.cache_clear()
    queue.reset_connection()
    assert queue.redis_ping() is False
    with pytest.raises(redis.RedisError):
        queue.enqueue_job("x")
