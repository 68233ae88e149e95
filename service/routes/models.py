"""/v1/models: register (multipart spec + safetensors weights), list, get, download."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from models_store import Store
from service import schemas
from service.domain import models as domain
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

router = APIRouter(prefix="/v1/models", tags=["models"])

_UPLOAD_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["spec", "weights"],
                    "properties": {
                        "spec": {
                            "type": "string",
                            "description": "JSON ModelCreate (plain field or file part)",
                        },
                        "weights": {"type": "string", "format": "binary",
                                    "description": "safetensors file"},
                    },
                }
            }
        },
    }
}


@router.post("", status_code=201, response_model=schemas.ModelPublic, openapi_extra=_UPLOAD_DOC)
async def register_model(
    request: Request,
    tenant: Tenant = Depends(current_tenant),
    session: Session = Depends(get_session),
    store: Store = Depends(get_store),
    settings: Settings = Depends(get_settings),
) -> schemas.ModelPublic:
    """Register a model: its spec (architecture, family, regularizer) and its weights."""
    form = await read_form(request, settings)
    try:
        spec = await read_json_part(form, "spec", schemas.ModelCreate, required=True)
        assert spec is not None
        weights = await read_file_part(form, "weights", settings.max_upload_bytes)
    finally:
        await form.close()
    model = await run_in_threadpool(
        domain.register_model, session, tenant, spec, weights, store
    )
    return domain.model_public(model)


@router.get("", response_model=schemas.ModelListPublic)
def list_models(
    limit: int = Query(50, ge=1, le=100),
    cursor: str | None = None,
    tenant: Tenant = Depends(current_tenant),
    session: Session = Depends(get_session),
) -> schemas.ModelListPublic:
    """The caller's models, newest first, a page at a time."""
    rows, next_cursor = domain.list_models(session, tenant.id, limit=limit, cursor=cursor)
    return schemas.ModelListPublic(
        items=[domain.model_public(m) for m in rows], next_cursor=next_cursor
    )


@router.get("/{model_id}", response_model=schemas.ModelPublic)
def get_model(
    model_id: str,
    tenant: Tenant = Depends(current_tenant),
    session: Session = Depends(get_session),
) -> schemas.ModelPublic:
    """One model (with its parent and removed rows if it came from unlearning)."""
    return domain.model_public(domain.get_model(session, tenant.id, model_id))


@router.get(
    "/{model_id}/weights",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def get_weights(
    model_id: str,
    tenant: Tenant = Depends(current_tenant),
    session: Session = Depends(get_session),
    store: Store = Depends(get_store),
) -> Response:
    """The model's weights as a safetensors file (verified against its sha256)."""
    model = domain.get_model(session, tenant.id, model_id)
    data = store.get(model.sha256, verify=True)
    return Response(
        data,
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": f'attachment; filename="{model.id}.safetensors"',
            "ETag": f'"{model.sha256}"',
        },
    )
