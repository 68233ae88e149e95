"""/v1/datasets: upload (.npz, .csv, .parquet), list, get."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from models_store import Store
from service import schemas
from service.domain import datasets as domain
from service.models import Tenant
from service.routes.deps import (
    current_tenant,
    get_session,
    get_settings,
    get_store,
    read_file_part,
    read_form,
    read_json_part,
)
from service.settings import Settings

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

_UPLOAD_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary",
                                 "description": ".npz (X, y, sensitive?), .csv or .parquet"},
                        "meta": {"type": "string",
                                 "description": "JSON DatasetMeta (plain field or file part)"},
                    },
                }
            }
        },
    }
}


@router.post(
    "", status_code=201, response_model=schemas.DatasetPublic, openapi_extra=_UPLOAD_DOC
)
async def upload_dataset(
    request: Request,
    tenant: Tenant = Depends(current_tenant),
    session: Session = Depends(get_session),
    store: Store = Depends(get_store),
    settings: Settings = Depends(get_settings),
) -> schemas.DatasetPublic:
    """Upload a dataset; it is validated and stored normalized as .npz."""
    form = await read_form(request, settings)
    try:
        meta = await read_json_part(form, "meta", schemas.DatasetMeta, required=False)
        data = await read_file_part(form, "file", settings.max_upload_bytes)
        part = form.get("file")
        filename = part.filename if isinstance(part, UploadFile) else None
    finally:
        await form.close()
    dataset = await run_in_threadpool(
        domain.register_dataset, session, tenant, filename, data, meta, store,
        settings.max_array_bytes,
    )
    return domain.dataset_public(dataset)


@router.get("", response_model=schemas.DatasetListPublic)
def list_datasets(
    limit: int = Query(50, ge=1, le=100),
    cursor: str | None = None,
    tenant: Tenant = Depends(current_tenant),
    session: Session = Depends(get_session),
) -> schemas.DatasetListPublic:
    """The caller's datasets, newest first, a page at a time."""
    rows, next_cursor = domain.list_datasets(session, tenant.id, limit=limit, cursor=cursor)
    return schemas.DatasetListPublic(
        items=[domain.dataset_public(d) for d in rows], next_cursor=next_cursor
    )


@router.get("/{dataset_id}", response_model=schemas.DatasetPublic)
def get_dataset(
    dataset_id: str,
    tenant: Tenant = Depends(current_tenant),
    session: Session = Depends(get_session),
) -> schemas.DatasetPublic:
    """One dataset's metadata."""
    return domain.dataset_public(domain.get_dataset(session, tenant.id, dataset_id))
