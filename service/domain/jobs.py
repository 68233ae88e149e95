"""The worker-facing life cycle of a job (submission, cancel and listing: submission.py).

Life cycle: queued -> running -> succeeded | failed | cancelled; queued -> cancelled.
Workers call claim_job, set_progress / heartbeat (both return the fresh row, whose
`cancel_requested` tells the worker to stop), then complete_job, fail_job or
mark_cancelled. The reconciler calls find_stale_jobs + requeue_or_fail, and
find_unenqueued_jobs + mark_enqueued.
"""

from __future__ import annotations

import io
import logging
import math
import re
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any, cast

import numpy as np
from sqlalchemy import CursorResult, Update, func, or_, select, update
from sqlalchemy.orm import Session

from models_store import Store
from service.errors import JobStateError, NotFound
from service.models import (
    TERMINAL_STATUSES,
    Artifact,
    Job,
    Model,
    new_id,
    utcnow,
)

logger = logging.getLogger(__name__)

_ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


def get_job(session: Session, tenant_id: str, job_id: str) -> Job:
    """The tenant's job; another tenant's or an unknown id is NotFound."""
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant_id:
        raise NotFound(f"job {job_id} not found", field="job_id")
    return job


def updated_rows(session: Session, statement: Update) -> int:
    """Execute an UPDATE; the number of rows it changed (conditional updates race safely)."""
    result = cast(CursorResult[Any], session.execute(statement))
    return int(result.rowcount)


# Limitation: SQLite ignores FOR UPDATE; there the conditional UPDATEs (status in the
# WHERE clause) are what keep two workers from both claiming or completing a job.
def _locked(session: Session, job_id: str) -> Job | None:
    return session.scalar(
        select(Job).where(Job.id == job_id).with_for_update().execution_options(
            populate_existing=True
        )
    )


def claim_job(session: Session, job_id: str, worker: str) -> Job | None:
    """queued -> running for `worker` (attempts += 1); None if the job is not queued."""
    now = utcnow()
    claimed = updated_rows(
        session,
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(
            status="running",
            worker=worker,
            attempts=Job.attempts + 1,
            started_at=now,
            heartbeat_at=now,
            enqueue_failed=False,
            progress={"phase": "starting", "done": 0, "total": 0},
        )
    )
    session.commit()
    if not claimed:
        logger.info("job %s not claimed by %s: not queued", job_id, worker)
        return None
    job = session.get(Job, job_id, populate_existing=True)
    logger.info("job %s claimed by %s (attempt %d)", job_id, worker, job.attempts if job else -1)
    return job


def heartbeat(session: Session, job_id: str) -> Job | None:
    """Refresh a running job's heartbeat; the fresh row (read `cancel_requested`, `status`)."""
    updated_rows(
        session,
        update(Job).where(Job.id == job_id, Job.status == "running").values(heartbeat_at=utcnow())
    )
    session.commit()
    return session.get(Job, job_id, populate_existing=True)


def set_progress(session: Session, job_id: str, phase: str, done: int, total: int) -> Job | None:
    """Record a running job's progress (and beat); the fresh row, as heartbeat."""
    updated_rows(
        session,
        update(Job)
        .where(Job.id == job_id, Job.status == "running")
        .values(
            progress={"phase": str(phase), "done": int(done), "total": int(total)},
            heartbeat_at=utcnow(),
        )
    )
    session.commit()
    return session.get(Job, job_id, populate_existing=True)


def mark_cancelled(session: Session, job_id: str) -> Job | None:
    """A worker that honoured a cancel request: running -> cancelled. None if unknown."""
    updated_rows(
        session,
        update(Job)
        .where(Job.id == job_id, Job.status.in_(("queued", "running")))
        .values(status="cancelled", finished_at=utcnow())
    )
    session.commit()
    return session.get(Job, job_id, populate_existing=True)


def fail_job(session: Session, job_id: str, code: str, message: str) -> Job | None:
    """Non-terminal -> failed with {code, message}; a terminal job is left as it is."""
    updated_rows(
        session,
        update(Job)
        .where(Job.id == job_id, Job.status.in_(("queued", "running")))
        .values(
            status="failed",
            error_code=code[:64],
            error_message=message,
            finished_at=utcnow(),
        )
    )
    session.commit()
    job = session.get(Job, job_id, populate_existing=True)
    logger.info("job %s failed: %s: %s", job_id, code, message)
    return job


def _finite(value: Any) -> Any:
    # JSON (and PostgreSQL's json) has no NaN/inf: they become null.
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer | np.bool_):
        return value.item()
    if isinstance(value, np.ndarray):
        return _finite(value.tolist())
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _weights_bytes(parameters: Mapping[str, Any]) -> tuple[bytes, int]:
    """safetensors bytes of a new model and its parameter count.

    `parameters` is {"weights": <safetensors bytes>, ...} or a state dict of tensors/arrays.
    """
    import torch
    from safetensors.torch import load, save

    if isinstance(parameters.get("weights"), bytes | bytearray):
        data = bytes(parameters["weights"])
        return data, int(sum(t.numel() for t in load(data).values()))
    tensors = {}
    for name, value in parameters.items():
        tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
        tensors[name] = tensor.detach().cpu().contiguous()
    return save(tensors), int(sum(t.numel() for t in tensors.values()))


def _removed_for(job: Job, values: Mapping[str, Any], arrays: Mapping[str, Any]) -> list[int]:
    if job.kind == "unlearning":
        return [int(i) for i in job.params.get("remove", [])]
    removed = arrays.get("removed", values.get("removed"))
    return [int(i) for i in np.asarray(removed if removed is not None else []).ravel()]


def _forget_new_blobs(session: Session, store: Store, created: list[str]) -> None:
    for digest in created:
        referenced = session.scalar(
            select(func.count()).select_from(Artifact).where(Artifact.sha256 == digest)
        ) or session.scalar(select(func.count()).select_from(Model).where(Model.sha256 == digest))
        if not referenced:
            store.delete(digest)


def complete_job(
    session: Session,
    job_id: str,
    *,
    values: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    timings: Mapping[str, float],
    device: str,
    versions: Mapping[str, Any],
    new_model: Mapping[str, Any] | None = None,
    removed: Sequence[int] | None = None,
    store: Store | None = None,
    inline_max: int | None = None,
) -> Job:
    """Store the result of a job and mark it succeeded, all in one transaction.

    Arrays with more than `inline_max` elements (default AFIF_INLINE_MAX) become .npy
    artifacts in the store and appear in the result as {"artifact", "shape", "dtype"};
    smaller ones are inlined as lists (NaN/inf -> null). `new_model` ({"weights":
    safetensors bytes, "removed_indices": [...]} or a state dict) becomes a Model row whose
    parent is the job's model and which records the removed row indices (default:
    params.remove for unlearning, result "removed" for fairness); the
    result then holds its `model_id`. Completing a job that already succeeded is a no-op;
    a cancelled or failed job is a JobStateError. Blobs written by a call that fails are
    deleted again unless a row references them.
    """
    from service.settings import get_settings

    if store is None:
        from service.storage import get_store

        store = get_store()
    if inline_max is None:
        inline_max = get_settings().inline_max

    job = _locked(session, job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found", field="job_id")
    if job.status == "succeeded":
        session.rollback()
        return job
    if job.status in TERMINAL_STATUSES:
        session.rollback()
        raise JobStateError(f"job {job_id} is {job.status}; it cannot be completed")

    created: list[str] = []
    try:
        result = _finite(dict(values))
        artifacts = []
        for name, raw in arrays.items():
            array = np.asarray(raw)
            if array.dtype == object:
                raise ValueError(f"array {name!r} has dtype object; results must be numeric")
            if array.size <= inline_max:
                result[name] = _finite(array.tolist())
                continue
            if not _ARTIFACT_NAME.match(name):
                raise ValueError(f"array name {name!r} is not a valid artifact name")
            blob = store.put(_npy_bytes(array))
            if blob.created:
                created.append(blob.sha256)
            artifacts.append(
                Artifact(
                    job_id=job.id,
                    name=name,
                    sha256=blob.sha256,
                    shape=list(array.shape),
                    dtype=array.dtype.str.lstrip("<>|="),
                    size_bytes=blob.size,
                )
            )
            result[name] = {
                "artifact": f"/v1/jobs/{job.id}/artifacts/{name}",
                "shape": list(array.shape),
                "dtype": str(array.dtype),
            }

        if new_model is not None:
            parent = session.get(Model, job.model_id)
            assert parent is not None
            data, n_parameters = _weights_bytes(new_model)
            blob = store.put(data)
            if blob.created:
                created.append(blob.sha256)
            if removed is None and "removed_indices" in new_model:
                removed = new_model["removed_indices"]
            indices = list(removed) if removed is not None else _removed_for(job, values, arrays)
            child = Model(
                id=new_id(),
                tenant_id=job.tenant_id,
                name=f"{parent.name}-unlearned-{len(indices)}"[:200],
                family=parent.family,
                architecture=parent.architecture,
                regularizer=parent.regularizer,
                scope=parent.scope,
                n_parameters=n_parameters,
                sha256=blob.sha256,
                size_bytes=blob.size,
                parent_id=parent.id,
                removed_indices=[int(i) for i in indices],
                source_job_id=job.id,
            )
            session.add(child)
            session.flush()
            result["model_id"] = child.id
            job.result_model_id = child.id

        for artifact in artifacts:
            session.add(artifact)
        job.result = result
        job.timings = _finite(dict(timings))
        job.device = str(device)[:64]
        job.versions = _finite(dict(versions))
        job.status = "succeeded"
        job.finished_at = utcnow()
        job.progress = {"phase": "done", **_done_total(job.progress)}
        session.commit()
    except Exception:
        session.rollback()
        _forget_new_blobs(session, store, created)
        raise
    logger.info("job %s succeeded (%d artifacts)", job_id, len(artifacts))
    return job


def _done_total(progress: Mapping[str, Any] | None) -> dict[str, int]:
    total = int((progress or {}).get("total", 0)) or 1
    return {"done": total, "total": total}


def find_stale_jobs(session: Session, older_than_seconds: float) -> list[Job]:
    """Running jobs whose last heartbeat (or start) is older than `older_than_seconds`."""
    cutoff = utcnow() - timedelta(seconds=older_than_seconds)
    stmt = select(Job).where(
        Job.status == "running",
        or_(
            Job.heartbeat_at < cutoff,
            (Job.heartbeat_at.is_(None)) & (Job.started_at < cutoff),
        ),
    )
    return list(session.scalars(stmt.order_by(Job.created_at)))


def find_unenqueued_jobs(session: Session, older_than_seconds: float = 0.0) -> list[Job]:
    """Queued jobs whose enqueue failed (or whose requeue is pending), oldest first."""
    cutoff = utcnow() - timedelta(seconds=older_than_seconds)
    stmt = select(Job).where(
        Job.status == "queued", Job.enqueue_failed.is_(True), Job.created_at <= cutoff
    )
    return list(session.scalars(stmt.order_by(Job.created_at)))


def mark_enqueued(session: Session, job_id: str) -> None:
    """The job id is on the queue again: clear enqueue_failed."""
    session.execute(update(Job).where(Job.id == job_id).values(enqueue_failed=False))
    session.commit()


def mark_enqueue_failed(session: Session, job_id: str) -> None:
    """The job is queued in the database but not on the queue: flag it for the reconciler."""
    updated_rows(
        session,
        update(Job).where(Job.id == job_id, Job.status == "queued").values(enqueue_failed=True)
    )
    session.commit()


def requeue_or_fail(session: Session, job: Job, max_attempts: int) -> bool:
    """A lost running job goes back to queued, or fails after `max_attempts` claims.

    True: the job is queued again (flagged enqueue_failed until the caller has enqueued
    it and called mark_enqueued). False: it failed with code worker_lost, was cancelled
    (a cancel had been requested), or is no longer running.
    """
    if job.cancel_requested:
        mark_cancelled(session, job.id)
        return False
    if job.attempts >= max_attempts:
        fail_job(
            session,
            job.id,
            "worker_lost",
            f"the worker died {job.attempts} time(s) while running this job; giving up",
        )
        return False

    moved = updated_rows(
        session,
        update(Job)
        .where(Job.id == job.id, Job.status == "running")
        .values(
            status="queued",
            worker=None,
            heartbeat_at=None,
            enqueue_failed=True,
            progress={"phase": "requeued", "done": 0, "total": 0},
        )
    )
    session.commit()
    session.refresh(job)
    if moved:
        logger.warning("job %s requeued after a lost worker (attempt %d)", job.id, job.attempts)
    return bool(moved)
