"""Jobs: submission, cancellation and listing (for routes), and the worker-facing life cycle.

Life cycle: queued -> running -> succeeded | failed | cancelled; queued -> cancelled.
Workers call claim_job, set_progress / heartbeat (both return the fresh row, whose
`cancel_requested` tells the worker to stop), then complete_job, fail_job or
mark_cancelled. The reconciler calls find_stale_jobs + requeue_or_fail, and
find_unenqueued_jobs + mark_enqueued.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import numpy as np
from pydantic import ValidationError
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from models_store import Store
from service import schemas
from service.domain.pagination import page as split_page
from service.domain.pagination import paginate
from service.errors import Conflict, InvalidInput, JobStateError, NotFound, validation_problem
from service.models import (
    TERMINAL_STATUSES,
    Artifact,
    Dataset,
    IdempotencyKey,
    Job,
    Model,
    Tenant,
    new_id,
    utcnow,
)

logger = logging.getLogger(__name__)

Enqueue = Callable[[str], Any]
_ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


# --- reading ------------------------------------------------------------------------------


def get_job(session: Session, tenant_id: str, job_id: str) -> Job:
    """The tenant's job; another tenant's or an unknown id is NotFound."""
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant_id:
        raise NotFound(f"job {job_id} not found", field="job_id")
    return job


def list_jobs(
    session: Session,
    tenant_id: str,
    *,
    status: str | None = None,
    kind: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[Job], str | None]:
    """A page of the tenant's jobs, newest first, optionally filtered; (items, next_cursor)."""
    if status is not None and status not in schemas.JobStatus.__args__:  # type: ignore[attr-defined]
        raise InvalidInput(f"status must be one of {schemas.JobStatus.__args__}", field="status")  # type: ignore[attr-defined]
    if kind is not None and kind not in schemas.JOB_KINDS:
        raise InvalidInput(f"kind must be one of {schemas.JOB_KINDS}", field="kind")

    stmt = select(Job).where(Job.tenant_id == tenant_id)
    if status is not None:
        stmt = stmt.where(Job.status == status)
    if kind is not None:
        stmt = stmt.where(Job.kind == kind)
    rows = list(session.scalars(paginate(stmt, Job, limit, cursor)))
    return split_page(rows, limit)


def job_public(job: Job) -> schemas.JobPublic:
    """The API view of a job row."""
    progress = job.progress or {}
    error = None
    if job.status == "failed" or job.error_code:
        error = schemas.JobError(code=job.error_code or "failed", message=job.error_message or "")
    return schemas.JobPublic(
        id=job.id,
        kind=job.kind,  # type: ignore[arg-type]
        status=job.status,  # type: ignore[arg-type]
        model_id=job.model_id,
        dataset_id=job.dataset_id,
        params=job.params,
        progress=schemas.JobProgress(
            phase=progress.get("phase"),
            done=int(progress.get("done", 0)),
            total=int(progress.get("total", 0)),
        ),
        timings=job.timings or {},
        device=job.device,
        error=error,
        attempts=job.attempts,
        cancel_requested=job.cancel_requested,
        result_url=f"/v1/jobs/{job.id}/result" if job.status == "succeeded" else None,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


def get_result(session: Session, tenant_id: str, job_id: str) -> dict[str, Any]:
    """The result of a succeeded job; JobStateError (409) before that."""
    job = get_job(session, tenant_id, job_id)
    if job.status != "succeeded" or job.result is None:
        raise JobStateError(
            f"job {job_id} is {job.status}; a result exists only once it has succeeded",
            status_now=job.status,
        )
    return job.result


def get_artifact(session: Session, tenant_id: str, job_id: str, name: str) -> Artifact:
    """The artifact `name` (with or without .npy) of the tenant's job."""
    job = get_job(session, tenant_id, job_id)
    stem = name[:-4] if name.endswith(".npy") else name
    for artifact in job.artifacts:
        if artifact.name == stem:
            return artifact
    raise NotFound(f"job {job_id} has no artifact {name!r}", field="name")


# --- submission ---------------------------------------------------------------------------


def parse_params(kind: str, params: Mapping[str, Any]) -> schemas._SolverParams:
    """Validate `params` against the schema of `kind`; errors name `params.<field>`."""
    model_cls = schemas.PARAMS_BY_KIND[kind]
    try:
        return model_cls.model_validate(dict(params))
    except ValidationError as exc:
        field, detail = validation_problem(list(exc.errors()), prefix="params")
        raise InvalidInput(detail, field=field) from None


def request_hash(body: schemas.JobCreate) -> str:
    """A digest of the request body, to tell a retried POST from a different one."""
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _owned(session: Session, entity: type[Any], tenant_id: str, row_id: str, field: str) -> Any:
    row = session.get(entity, row_id)
    if row is None or row.tenant_id != tenant_id:
        what = "model" if entity is Model else "dataset"
        raise NotFound(f"{what} {row_id} not found", field=field)
    return row


def _check_indices(indices: Sequence[int] | None, n_rows: int, field: str) -> None:
    if indices is None:
        return
    bad = [i for i in indices if i < 0 or i >= n_rows]
    if bad:
        raise InvalidInput(
            f"{field}: index {bad[0]} is out of range for a dataset of {n_rows} rows"
            + (f" ({len(bad)} indices out of range)" if len(bad) > 1 else ""),
            field=field,
        )


def _check_fit(
    model: Model, dataset: Dataset, store: Store, field: str, *, need_sensitive: bool = False
) -> None:
    """Input width and labels of `dataset` must suit `model` (422 naming `field` otherwise)."""
    from service.domain.datasets import load_dataset_arrays
    from service.domain.models import check_dataset_against_model

    if need_sensitive and not dataset.has_sensitive:
        raise InvalidInput(
            f"{field}: dataset {dataset.id} has no `sensitive` column; fairness needs one",
            field=field,
        )
    # Only y is read: the row already records the feature shape.
    labels = load_dataset_arrays(dataset, store, names=("y",))["y"]
    check_dataset_against_model(model, dataset.feature_shape, labels, field=field)


def submit_job(
    session: Session,
    tenant: Tenant,
    body: schemas.JobCreate,
    store: Store,
    *,
    idempotency_key: str | None = None,
    enqueue: Enqueue | None = None,
) -> tuple[Job, bool]:
    """Validate, write the job row (and idempotency key) in one transaction, then enqueue.

    Returns (job, created). A retried request with the same Idempotency-Key returns the
    original job with created=False; the same key with a different body is a Conflict.
    If `enqueue` raises, the row keeps status queued with enqueue_failed=True so the
    reconciler re-enqueues it.
    """
    digest = request_hash(body)
    if idempotency_key is not None:
        if not 1 <= len(idempotency_key) <= 200:
            raise InvalidInput("Idempotency-Key must be 1..200 characters", field="Idempotency-Key")
        existing = _find_idempotent(session, tenant.id, idempotency_key, digest)
        if existing is not None:
            return existing, False

    params = parse_params(body.kind, body.params)
    model = _owned(session, Model, tenant.id, body.model_id, "model_id")
    dataset = _owned(session, Dataset, tenant.id, body.dataset_id, "dataset_id")
    _validate_against_data(session, tenant, body.kind, params, model, dataset, store)

    job = Job(
        id=new_id(),
        tenant_id=tenant.id,
        kind=body.kind,
        status="queued",
        model_id=model.id,
        dataset_id=dataset.id,
        params=params.model_dump(mode="json"),
        progress={"phase": "queued", "done": 0, "total": 0},
        timings={},
    )
    session.add(job)
    if idempotency_key is not None:
        # No ORM relationship orders these inserts; the job row must exist first.
        session.flush()
        session.add(
            IdempotencyKey(
                tenant_id=tenant.id, key=idempotency_key, request_hash=digest, job_id=job.id
            )
        )
    try:
        session.commit()
    except Exception:
        session.rollback()
        # A concurrent request with the same key won the race: answer with its job.
        if idempotency_key is not None:
            existing = _find_idempotent(session, tenant.id, idempotency_key, digest)
            if existing is not None:
                return existing, False
        raise
    logger.info("job %s submitted (%s, tenant %s)", job.id, job.kind, tenant.name)

    _enqueue_after_commit(session, job, enqueue)
    return job, True


def _find_idempotent(session: Session, tenant_id: str, key: str, digest: str) -> Job | None:
    row = session.scalar(
        select(IdempotencyKey).where(
            IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key == key
        )
    )
    if row is None:
        return None
    if row.request_hash != digest:
        raise Conflict(
            "Idempotency-Key was already used with a different request body",
            field="Idempotency-Key",
        )
    return session.get(Job, row.job_id)


def _validate_against_data(
    session: Session,
    tenant: Tenant,
    kind: str,
    params: schemas._SolverParams,
    model: Model,
    dataset: Dataset,
    store: Store,
) -> None:
    _check_fit(model, dataset, store, "dataset_id", need_sensitive=kind == "fairness")

    if isinstance(params, schemas.UnlearningParams):
        _check_indices(params.remove, dataset.n_rows, "params.remove")
        if len(params.remove) >= dataset.n_rows:
            raise InvalidInput("params.remove: cannot remove every training row",
                               field="params.remove")
    elif isinstance(params, schemas.AttributionParams):
        test = _owned(session, Dataset, tenant.id, params.test_dataset_id,
                      "params.test_dataset_id")
        _check_fit(model, test, store, "params.test_dataset_id")
        _check_indices(params.test_indices, test.n_rows, "params.test_indices")
    elif isinstance(params, schemas.CvParams):
        if params.k is not None and params.k >= dataset.n_rows:
            raise InvalidInput(
                f"params.k: must be smaller than the dataset's {dataset.n_rows} rows",
                field="params.k",
            )


def _enqueue_after_commit(session: Session, job: Job, enqueue: Enqueue | None) -> None:
    if enqueue is None:
        from service.queue import enqueue_job

        enqueue = enqueue_job
    try:
        enqueue(job.id)
    except Exception:
        logger.exception("enqueue of job %s failed; the reconciler will retry", job.id)
        mark_enqueue_failed(session, job.id)


def cancel_job(
    session: Session,
    tenant_id: str,
    job_id: str,
    *,
    cancel_in_queue: Callable[[str], Any] | None = None,
) -> Job:
    """Queued -> cancelled now (and dropped from the queue); running -> cancel requested.

    A terminal job is a JobStateError (409).
    """
    job = get_job(session, tenant_id, job_id)
    now = utcnow()

    done = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(status="cancelled", cancel_requested=True, finished_at=now,
                progress={"phase": "cancelled", "done": 0, "total": 0})
    ).rowcount
    if done:
        session.commit()
        session.refresh(job)
        _drop_from_queue(job_id, cancel_in_queue)
        logger.info("job %s cancelled while queued", job_id)
        return job

    requested = session.execute(
        update(Job).where(Job.id == job_id, Job.status == "running").values(cancel_requested=True)
    ).rowcount
    session.commit()
    session.refresh(job)
    if not requested:
        raise JobStateError(f"job {job_id} is already {job.status}", status_now=job.status)
    logger.info("job %s: cancellation requested while running", job_id)
    return job


def _drop_from_queue(job_id: str, cancel_in_queue: Callable[[str], Any] | None) -> None:
    try:
        if cancel_in_queue is None:
            from service.queue import cancel_in_queue as cancel_in_queue
        cancel_in_queue(job_id)
    except Exception:
        # The row already says cancelled, and claim_job refuses cancelled jobs.
        logger.exception("could not remove job %s from the queue", job_id)


# --- worker-facing ------------------------------------------------------------------------


def _locked(session: Session, job_id: str) -> Job | None:
    return session.scalar(
        select(Job).where(Job.id == job_id).with_for_update().execution_options(
            populate_existing=True
        )
    )


def claim_job(session: Session, job_id: str, worker: str) -> Job | None:
    """queued -> running for `worker` (attempts += 1); None if the job is not queued."""
    now = utcnow()
    claimed = session.execute(
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
    ).rowcount
    session.commit()
    if not claimed:
        logger.info("job %s not claimed by %s: not queued", job_id, worker)
        return None
    job = session.get(Job, job_id, populate_existing=True)
    logger.info("job %s claimed by %s (attempt %d)", job_id, worker, job.attempts if job else -1)
    return job


def heartbeat(session: Session, job_id: str) -> Job | None:
    """Refresh a running job's heartbeat; the fresh row (read `cancel_requested`, `status`)."""
    session.execute(
        update(Job).where(Job.id == job_id, Job.status == "running").values(heartbeat_at=utcnow())
    )
    session.commit()
    return session.get(Job, job_id, populate_existing=True)


def set_progress(session: Session, job_id: str, phase: str, done: int, total: int) -> Job | None:
    """Record a running job's progress (and beat); the fresh row, as heartbeat."""
    session.execute(
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
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(("queued", "running")))
        .values(status="cancelled", finished_at=utcnow())
    )
    session.commit()
    return session.get(Job, job_id, populate_existing=True)


def fail_job(session: Session, job_id: str, code: str, message: str) -> Job | None:
    """Non-terminal -> failed with {code, message}; a terminal job is left as it is."""
    session.execute(
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
    session.execute(
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

    moved = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == "running")
        .values(
            status="queued",
            worker=None,
            heartbeat_at=None,
            enqueue_failed=True,
            progress={"phase": "requeued", "done": 0, "total": 0},
        )
    ).rowcount
    session.commit()
    session.refresh(job)
    if moved:
        logger.warning("job %s requeued after a lost worker (attempt %d)", job.id, job.attempts)
    return bool(moved)
