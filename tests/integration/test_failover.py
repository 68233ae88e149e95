"""Lost workers, on a stack laid out like docker-compose: separate `afif migrate`, `afif api`,
`afif worker` and `afif reconcile` processes sharing Redis and PostgreSQL (SQLite when the
PostgreSQL server binaries are absent). A worker SIGKILLed mid-job never leaves the job
stuck: it is retried and succeeds, or fails with a reason after AFIF_MAX_ATTEMPTS."""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from rq.job import Job as RqJob
from sqlalchemy import create_engine, text

from service.queue import EmbeddedRedis, rq_job_id
from tests.integration.stack import (
    ENDLESS_PARAMS,
    REPO,
    SLOW_PARAMS,
    Fitted,
    Uploaded,
    afif,
    distance,
    download_weights,
    free_port,
    influence_step,
    result_of,
    stack_env,
    submit,
    upload_dataset,
    upload_model,
    wait_for,
    wait_http,
)

pytestmark = pytest.mark.integration

MAX_ATTEMPTS = 2


@dataclass
class SplitStack:
    """One process per role, as in docker-compose.yml; workers started and killed at will."""

    data_dir: Path
    env: dict[str, str]
    database_url: str
    port: int = field(default_factory=free_port)
    processes: list[subprocess.Popen] = field(default_factory=list)
    workers: list[subprocess.Popen] = field(default_factory=list)
    log_paths: dict[int, Path] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self, *args: str) -> subprocess.Popen:
        path = self.data_dir / f"{args[0]}-{len(self.processes)}.log"
        log = open(path, "w")
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", *args],
            cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        self.processes.append(process)
        self.log_paths[process.pid] = path
        return process

    def wait_for_log(self, process: subprocess.Popen, words: str, timeout: float = 30) -> None:
        """Wait until `process` has logged `words` (case-insensitive)."""
        deadline = time.monotonic() + timeout
        while words.lower() not in self.log_paths[process.pid].read_text().lower():
            assert time.monotonic() < deadline, f"no {words!r} logged:\n{self.logs()}"
            time.sleep(0.05)

    def worker(self) -> subprocess.Popen:
        process = self.spawn("worker")
        self.workers.append(process)
        return process

    def stop_workers(self) -> None:
        """SIGTERM every worker still alive (idle ones exit at once)."""
        for process in self.workers:
            if process.poll() is None:
                process.terminate()
        for process in self.workers:
            process.wait(timeout=30)

    def update_job(self, job_id: str, **values: Any) -> None:
        """Change a job row behind the service's back (to stage what the reconciler sees)."""
        from service.db import session_scope
        from service.models import Job

        with session_scope(self.database_url) as session:
            job = session.get(Job, job_id)
            assert job is not None
            for name, value in values.items():
                setattr(job, name, value(getattr(job, name)) if callable(value) else value)
            session.commit()

    def job_row(self, job_id: str) -> Any:
        from service.db import session_scope
        from service.models import Job

        with session_scope(self.database_url) as session:
            return session.get(Job, job_id)

    def worker_of(self, job_id: str) -> str | None:
        """The worker name recorded on the job row (host.pid.suffix)."""
        engine = create_engine(self.database_url)
        try:
            with engine.connect() as connection:
                return connection.execute(
                    text("SELECT worker FROM jobs WHERE id = :id"), {"id": job_id}
                ).scalar()
        finally:
            engine.dispose()

    def logs(self) -> str:
        return "\n".join(
            f"== {path.name}\n{path.read_text()[-3000:]}" for path in self.data_dir.glob("*.log")
        )


def _database_url(request: pytest.FixtureRequest, data_dir: Path) -> str:
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        return f"sqlite:///{data_dir / 'afif.db'}"
    server = request.getfixturevalue("pg_server")
    name = f"failover_{os.getpid()}"
    server.execute(f"CREATE DATABASE {name}")
    return str(server.url(name))


@pytest.fixture(scope="module")
def split(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SplitStack]:
    data_dir = tmp_path_factory.mktemp("afif-split")
    redis_server = EmbeddedRedis(data_dir)
    redis_server.start()
    database_url = _database_url(request, data_dir)
    env = stack_env(
        data_dir, REDIS_URL=redis_server.url, DATABASE_URL=database_url,
        AFIF_MAX_ATTEMPTS=str(MAX_ATTEMPTS),
    )
    stack = SplitStack(data_dir=data_dir, env=env, database_url=database_url)
    try:
        afif("migrate", env=env)
        stack.spawn("api", "--port", str(stack.port))
        stack.spawn("reconcile", "--interval", "0.5")
        wait_http(stack.url)
        yield stack
    finally:
        for process in stack.processes:
            if process.poll() is None:
                process.terminate()
        for process in stack.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        redis_server.stop()


@pytest.fixture(autouse=True)
def no_leftover_workers(split: SplitStack) -> Iterator[None]:
    """Each test starts and ends without workers, whatever happened in the last one."""
    split.stop_workers()
    yield
    split.stop_workers()


@pytest.fixture(scope="module")
def carol(split: SplitStack) -> Iterator[httpx.Client]:
    key = afif("keys", "create", "--tenant", "carol", env=split.env).stdout.strip().splitlines()[-1]
    with httpx.Client(
        base_url=split.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    ) as client:
        yield client


@pytest.fixture(scope="module")
def carol_data(carol: httpx.Client, fitted: Fitted) -> Uploaded:
    return Uploaded(
        model=upload_model(carol, fitted),
        train=upload_dataset(carol, "train", X=fitted.X, y=fitted.y),
        test=upload_dataset(carol, "test", X=fitted.X_test, y=fitted.y_test),
    )


def _runs(split: SplitStack, client: httpx.Client, job_id: str,
          worker: subprocess.Popen) -> bool:
    if client.get(f"/v1/jobs/{job_id}").json()["status"] != "running":
        return False
    name = split.worker_of(job_id)
    return name is not None and name.split(".")[-2] == str(worker.pid)


def kill_worker_running(split: SplitStack, client: httpx.Client, job_id: str,
                        worker: subprocess.Popen) -> None:
    """Wait until `worker` runs the job, then SIGKILL it (no chance to hand the job back)."""
    deadline = time.monotonic() + 60
    while not _runs(split, client, job_id, worker):
        assert time.monotonic() < deadline, f"worker {worker.pid} never ran job {job_id}"
        assert worker.poll() is None, f"worker exited:\n{split.logs()}"
        time.sleep(0.1)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(timeout=10)


def test_killed_worker_job_is_retried_and_succeeds(
    split: SplitStack, carol: httpx.Client, carol_data: Uploaded, fitted: Fitted
) -> None:
    first = split.worker()
    job = submit(carol, "unlearning", carol_data, **SLOW_PARAMS)
    kill_worker_running(split, carol, job["id"], first)

    # The reconciler finds the silent job and requeues it; a fresh worker takes it.
    requeued = wait_for(carol, job["id"], {"queued", "succeeded", "failed"}, timeout=60)
    assert requeued["status"] == "queued", requeued
    second = split.worker()
    result = result_of(carol, job["id"])
    finished = carol.get(f"/v1/jobs/{job['id']}").json()
    assert finished["attempts"] == 2
    assert split.worker_of(job["id"]).split(".")[-2] == str(second.pid)

    # The retry computed what a clean run computes: the influence step, up to LiSSA's
    # truncation error.
    unlearned = download_weights(carol, result["model_id"])
    expected = influence_step(fitted, SLOW_PARAMS["remove"])
    original = (fitted.coef, fitted.intercept)
    assert distance(unlearned, expected) < 2e-2 * distance(original, expected)
    second.terminate()
    assert second.wait(timeout=30) == 0


def test_job_that_keeps_killing_workers_fails_with_a_reason(
    split: SplitStack, carol: httpx.Client, carol_data: Uploaded
) -> None:
    job = submit(carol, "unlearning", carol_data, **SLOW_PARAMS)
    for _ in range(MAX_ATTEMPTS):
        worker = split.worker()
        kill_worker_running(split, carol, job["id"], worker)

    failed = wait_for(carol, job["id"], timeout=60)
    assert failed["status"] == "failed", failed
    assert failed["error"]["code"] == "worker_lost"
    assert f"{MAX_ATTEMPTS} time" in failed["error"]["message"]
    assert failed["attempts"] == MAX_ATTEMPTS
    assert carol.get(f"/v1/jobs/{job['id']}/result").status_code == 409


def test_queued_job_waits_for_a_worker_and_survives_an_api_restart(
    split: SplitStack, carol: httpx.Client, carol_data: Uploaded
) -> None:
    # No worker is running. The job is backdated past the reconciler's grace period, so the
    # next pass examines it: it waits in Redis, so the pass must leave it queued, neither
    # failed nor enqueued a second time. A flagged witness job shows when a pass has run.
    job = submit(carol, "cv", carol_data, folds=2, solver="exact")
    witness = submit(carol, "cv", carol_data, folds=3, solver="exact")
    split.update_job(job["id"], created_at=lambda at: at - timedelta(hours=1))
    split.update_job(witness["id"], enqueue_failed=True)
    deadline = time.monotonic() + 30
    while split.job_row(witness["id"]).enqueue_failed:
        assert time.monotonic() < deadline, f"no reconciler pass:\n{split.logs()}"
        time.sleep(0.1)

    row = split.job_row(job["id"])
    assert (row.status, row.attempts, row.enqueue_failed) == ("queued", 0, False)
    connection = redis.Redis.from_url(split.env["REDIS_URL"])
    assert RqJob.fetch(rq_job_id(job["id"]), connection=connection).get_status() == "queued"

    api = split.processes[0]
    api.send_signal(signal.SIGTERM)
    # uvicorn shuts down cleanly, then re-raises the signal (exit status -SIGTERM).
    assert api.wait(timeout=30) in (0, -signal.SIGTERM)
    split.processes[0] = split.spawn("api", "--port", str(split.port))
    wait_http(split.url)
    worker = split.worker()
    result = result_of(carol, job["id"])
    assert len(result["per_fold"]) == 2 and np.isfinite(result["estimate"])
    assert carol.get(f"/v1/jobs/{job['id']}").json()["attempts"] == 1
    worker.terminate()
    assert worker.wait(timeout=30) == 0


def test_twice_terminated_worker_hands_its_job_back(
    split: SplitStack, carol: httpx.Client, carol_data: Uploaded
) -> None:
    worker = split.worker()
    job = submit(carol, "unlearning", carol_data, **ENDLESS_PARAMS)
    deadline = time.monotonic() + 60
    while not _runs(split, carol, job["id"], worker):
        assert time.monotonic() < deadline, f"worker never ran the job:\n{split.logs()}"
        time.sleep(0.1)

    # First SIGTERM: warm shutdown (finish the job); second: stop it and give it back. RQ
    # ignores a second signal within 1 s of the first (a double Ctrl-C), so send it again
    # only while the last one was ignored (no cold shutdown logged), rather than guess a delay.
    worker.send_signal(signal.SIGTERM)
    split.wait_for_log(worker, "warm shut down requested")
    deadline = time.monotonic() + 30
    while "cold shut down" not in split.log_paths[worker.pid].read_text():
        assert time.monotonic() < deadline, f"worker ignored SIGTERM:\n{split.logs()}"
        worker.send_signal(signal.SIGTERM)
        with contextlib.suppress(AssertionError):
            split.wait_for_log(worker, "cold shut down", timeout=0.5)
    worker.wait(timeout=30)

    handed_back = carol.get(f"/v1/jobs/{job['id']}").json()
    assert (handed_back["status"], handed_back["attempts"]) == ("queued", 1), handed_back

    # Another worker takes it up again; cancel rather than wait out the endless solve.
    second = split.worker()
    deadline = time.monotonic() + 60
    while not _runs(split, carol, job["id"], second):
        assert time.monotonic() < deadline, f"no worker took the job back:\n{split.logs()}"
        time.sleep(0.1)
    assert carol.get(f"/v1/jobs/{job['id']}").json()["attempts"] == 2
    assert carol.post(f"/v1/jobs/{job['id']}/cancel").status_code in (200, 202)
    assert wait_for(carol, job["id"], timeout=60)["status"] == "cancelled"
