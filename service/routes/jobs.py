"""/v1/jobs: submit, get, list, result, artifacts, cancel."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.orm import Session

from models_store import Store
from service import schemas
from service.domain import submission as domain
from service.models import Tenant
from service.routes.deps import current_tenant, get_session, get_store

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=202, response_model=schemas.JobPublic)
def submit_job(
    body: schemas.JobCreate,
    request: Request,
    idempotency_key: str | None = Header(None, alias="Idempotency-Key"),
    tenant: Tenant = Depends(current_tenant),
    session: Session = Depends(get_session),
    store: Store = Depends(get_store),
) -> JSONResponse:
    """Queue a job; a retry with the same Idempotency-Key returns the same job."""
    job, _created = domain.submit_job(
        session,
        tenant,
        body,
        store,
        idempotency_key=idempotency_key,
        enqueue=request.app.state.enqueue,
    )
    public = domain.job_public(job)
    return JSONResponse(
        public.model_dump(mode="json"),
        status_code=202,
        headers={"Location": f"/v1/jobs/{job.id}"},
    )


@router.get("", response_model=schemas.JobListPublic)
def list_jobs(
    status: schemas.JobStatus | None = None,
    kind: schemas.JobKind | None = None,
    limit: int = Query(50, ge=1, le=100),
    cursor: str | None = None,
    tenant: Tenant = Depends(current_tenant),
    session: Session = Depends(get_session),
) -> schemas.JobListPublic:
    """The caller's jobs, newest first, optionally filtered by status and kind."""
    rows, next_cursor = domain.list_jobs(
        session, tenant.id, status=status, kind=kind, limit=limit, cursor=cursor
    )
    return schemas.JobListPublic(items=[domain.job_public(j) for j in rows],
                                 next_cursor=next_cursor)


@router.get("/{job_id}", response_model=schemas.JobPublic)
def get_job(
    job_id: str,
    tenant: Tenant = Depends(current_tenant),
    session: Session = Depends(get_session),
) -> schemas.JobPublic:
    """A job's status, progress, timings and error."""
    return domain.job_public(domain.get_job(session, tenant.id, job_id))


@router.get("/{job_id}/result")
def get_result(
    job_id: str,
    tenant: Tenant = Depends(current_tenant),
    session: Session = Depends(get_session),
) -> dict[str, Any]:
    """The result of a succeeded job (409 before); large arrays are artifact references."""
    return domain.get_result(session, tenant.id, job_id)


@router.get(
    "/{job_id}/artifacts/{name}",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def get_artifact(
    job_id: str,
    name: str,
    tenant: Tenant = Depends(current_tenant),
    session: Session = Depends(get_session),
    store: Store = Depends(get_store),
) -> Response:
    """A result array as a .npy file (load with numpy.load(..., allow_pickle=False))."""
    artifact = domain.get_artifact(session, tenant.id, job_id, name)
    # Limitation: served from memory, so the blob can be hash-checked before it is sent.
    return Response(
        store.get(artifact.sha256, verify=True),
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{artifact.name}.npy"'},
    )


@router.post("/{job_id}/cancel", response_model=schemas.JobPublic)
def cancel_job(
    job_id: str,
    request: Request,
    tenant: Tenant = Depends(current_tenant),
    session: Session = Depends(get_session),
) -> schemas.JobPublic:
    """Cancel: a queued job at once, a running one at its next progress check (409 if done)."""
    job = domain.cancel_job(
        session, tenant.id, job_id, cancel_in_queue=request.app.state.cancel_in_queue
    )
    return domain.job_public(job)
