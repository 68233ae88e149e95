"""Jobs as routes see them: submit (validated against model and data, idempotent), cancel,
list, and read results and artifacts. The worker-facing life cycle is in jobs.py."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from models_store import Store
from service import schemas
from service.domain.jobs import get_job, mark_enqueue_failed, updated_rows
from service.domain.pagination import page as split_page
from service.domain.pagination import paginate
from service.errors import Conflict, InvalidInput, JobStateError, NotFound, validation_problem
from service.models import Artifact, Dataset, IdempotencyKey, Job, Model, Tenant, new_id, utcnow

logger = logging.getLogger(__name__)

Enqueue = Callable[[str], Any]


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
    if status is not None and status not in schemas.JOB_STATUSES:
        raise InvalidInput(f"status must be one of {schemas.JOB_STATUSES}", field="status")
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
        versions=job.versions,
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


def parse_params(kind: str, params: Mapping[str, Any]) -> schemas.JobParams:
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
    # Limitation: each submission reads the stored labels again (O(n_rows)); label summaries
    # kept on the row would not do, since the family rule depends on the model.
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
    params: schemas.JobParams,
    model: Model,
    dataset: Dataset,
    store: Store,
) -> None:
    _check_fit(model, dataset, store, "dataset_id", need_sensitive=kind == "fairness")
    _check_method(params, model)

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
        _check_folds(params, dataset.n_rows)
    elif isinstance(params, schemas.FairnessParams) and params.metric == "demographic_parity":
        _check_parity(model, dataset, store)


# The engine's penalties that are twice differentiable (any penalty at strength 0 is too).
SMOOTH_REGULARIZERS = ("none", "l2")


def _check_method(params: schemas.JobParams, model: Model) -> None:
    """method=hessian needs a smooth penalty: the proximal step wants a PSD metric."""
    kind = str(model.regularizer.get("kind", "none"))
    strength = float(model.regularizer.get("strength", 0.0))
    if params.method == "hessian" and kind not in SMOOTH_REGULARIZERS and strength != 0.0:
        raise InvalidInput(
            f"params.method: 'hessian' needs a smooth regularizer, but model {model.id} uses "
            f"{kind!r}; use method 'fisher' (proximal Fisher step)",
            field="params.method",
        )


def _check_folds(params: schemas.CvParams, n_rows: int) -> None:
    """Folds the engine can draw: disjoint, at least two unless `k` fixes their size."""
    if params.k is not None and params.k >= n_rows:
        raise InvalidInput(
            f"params.k: must be smaller than the dataset's {n_rows} rows", field="params.k"
        )
    if params.folds is None:
        k = params.k or 1
        if n_rows // k > schemas.MAX_CV_FOLDS:
            raise InvalidInput(
                f"params.folds: null means n // k = {n_rows // k} folds here, more than the "
                f"{schemas.MAX_CV_FOLDS} a job may evaluate; set k >= "
                f"{-(-n_rows // schemas.MAX_CV_FOLDS)} or give folds",
                field="params.folds",
            )
        return
    if params.k is None and params.folds < 2:
        raise InvalidInput(
            f"params.folds: cross-validation needs at least 2 folds, got {params.folds}",
            field="params.folds",
        )
    if params.folds > n_rows:
        raise InvalidInput(
            f"params.folds: {params.folds} folds need at least as many rows; the dataset "
            f"has {n_rows}",
            field="params.folds",
        )
    if params.k is not None and params.k * params.folds > n_rows:
        raise InvalidInput(
            f"params.folds: {params.folds} disjoint folds of k={params.k} rows need "
            f"{params.k * params.folds} rows; the dataset has {n_rows}",
            field="params.folds",
        )


def _check_parity(model: Model, dataset: Dataset, store: Store) -> None:
    """Demographic parity compares positive rates: a binary classifier, two groups."""
    import numpy as np

    from engine.errors import SpecError
    from engine.spec import output_dim
    from service.domain.datasets import load_dataset_arrays

    try:
        outputs = output_dim(model.architecture)
    except SpecError:
        outputs = None
    binary = model.family == "bernoulli" or (model.family == "categorical" and outputs == 2)
    if not binary:
        raise InvalidInput(
            f"params.metric: demographic_parity needs a binary classifier (bernoulli, or "
            f"categorical with 2 outputs); model {model.id} is {model.family} with "
            f"{outputs} outputs; use metric 'chi2'",
            field="params.metric",
        )
    sensitive = load_dataset_arrays(dataset, store, names=("sensitive",))["sensitive"]
    values = np.unique(sensitive)
    if values.size != 2:
        raise InvalidInput(
            f"dataset_id: demographic_parity needs a sensitive column with exactly two "
            f"values; dataset {dataset.id} has {values.size}; use metric 'chi2'",
            field="dataset_id",
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

    done = updated_rows(
        session,
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(status="cancelled", cancel_requested=True, finished_at=now,
                progress={"phase": "cancelled", "done": 0, "total": 0})
    )
    if done:
        session.commit()
        session.refresh(job)
        _drop_from_queue(job_id, cancel_in_queue)
        logger.info("job %s cancelled while queued", job_id)
        return job

    requested = updated_rows(
        session,
        update(Job).where(Job.id == job_id, Job.status == "running").values(cancel_requested=True)
    )
    session.commit()
    session.refresh(job)
    if not requested:
        raise JobStateError(f"job {job_id} is already {job.status}", status_now=job.status)
    logger.info("job %s: cancellation requested while running", job_id)
    return job


def _drop_from_queue(job_id: str, cancel_in_queue: Callable[[str], Any] | None) -> None:
    try:
        if cancel_in_queue is None:
            from service.queue import cancel_in_queue as queue_cancel

            cancel_in_queue = queue_cancel
        cancel_in_queue(job_id)
    except Exception:
        # The row already says cancelled, and claim_job refuses cancelled jobs.
        logger.exception("could not remove job %s from the queue", job_id)


