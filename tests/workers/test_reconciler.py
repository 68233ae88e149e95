"""The reconciler against a real database (SQLite and PostgreSQL) and a real (embedded) Redis."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from service import queue
from service.db import session_scope
from service.models import Dataset, Job, Model, Tenant, utcnow
from workers.reconciler import reconcile_once


def make_rows(**job_fields: Any) -> str:
    """A tenant, model, dataset and one job with `job_fields`; returns the job id."""
    with session_scope() as session:
        tenant = Tenant(name=f"t-{utcnow().timestamp()}")
        session.add(tenant)
        session.flush()
        model = Model(
            tenant_id=tenant.id, name="m", family="bernoulli",
            architecture={"layers": [{"type": "linear", "in_features": 2, "out_features": 1}]},
            regularizer={"kind": "l2", "strength": 0.01}, scope=None, n_parameters=3,
            sha256="0" * 64, size_bytes=1,
        )
        dataset = Dataset(
            tenant_id=tenant.id, name="d", n_rows=4, n_features=2, feature_shape=[2],
            y_dtype="int64", has_sensitive=False, source_format="npz", sha256="1" * 64,
            size_bytes=1,
        )
        session.add_all([model, dataset])
        session.flush()
        job = Job(
            tenant_id=tenant.id, kind="cv", model_id=model.id, dataset_id=dataset.id,
            params={"folds": 2}, **job_fields,
        )
        session.add(job)
        session.commit()
        return job.id


def ago(seconds: float) -> Any:
    return utcnow() - timedelta(seconds=seconds)


def job_row(job_id: str) -> Job:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def queued_ids() -> list[str]:
    return list(queue.get_queue().job_ids)


def test_lost_running_job_is_requeued_and_enqueued(runtime: Path) -> None:
    lost = make_rows(status="running", attempts=1, worker="gone.1", heartbeat_at=ago(100))
    alive = make_rows(status="running", attempts=1, worker="here.2", heartbeat_at=ago(1))

    summary = reconcile_once(stale_after_seconds=10, max_attempts=3)

    assert summary.requeued == [lost] and summary.failed == []
    row = job_row(lost)
    assert (row.status, row.attempts, row.worker, row.enqueue_failed) == ("queued", 1, None, False)
    assert queued_ids() == [queue.rq_job_id(lost)]
    assert job_row(alive).status == "running"


def test_job_lost_too_often_fails_with_a_reason(runtime: Path) -> None:
    job_id = make_rows(status="running", attempts=3, heartbeat_at=ago(100))

    summary = reconcile_once(stale_after_seconds=10, max_attempts=3)

    row = job_row(job_id)
    assert summary.failed == [job_id]
    assert row.status == "failed" and row.error_code == "worker_lost"
    assert "3 time" in (row.error_message or "")
    assert queued_ids() == []


def test_lost_job_with_a_cancel_request_ends_cancelled(runtime: Path) -> None:
    job_id = make_rows(status="running", attempts=1, heartbeat_at=ago(100), cancel_requested=True)

    reconcile_once(stale_after_seconds=10, max_attempts=3)

    assert job_row(job_id).status == "cancelled"
    assert queued_ids() == []


def test_never_enqueued_jobs_are_enqueued_once(runtime: Path) -> None:
    flagged = make_rows(status="queued", enqueue_failed=True)
    forgotten = make_rows(status="queued", created_at=ago(100))
    fresh = make_rows(status="queued")  # the API may be enqueueing it right now

    first = reconcile_once(stale_after_seconds=10, max_attempts=3)
    second = reconcile_once(stale_after_seconds=10, max_attempts=3)

    assert sorted(first.enqueued) == sorted([flagged, forgotten])
    assert not second, "a job waiting in Redis must not be enqueued twice"
    assert sorted(queued_ids()) == sorted(queue.rq_job_id(j) for j in (flagged, forgotten))
    assert not job_row(flagged).enqueue_failed
    assert job_row(fresh).status == "queued"


def test_terminal_jobs_are_left_alone(runtime: Path) -> None:
    done = make_rows(status="succeeded", attempts=1, heartbeat_at=ago(1000), created_at=ago(1000))

    assert not reconcile_once(stale_after_seconds=10, max_attempts=3)
    assert job_row(done).status == "succeeded"
