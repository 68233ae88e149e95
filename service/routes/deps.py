"""Dependencies shared by the routes: a database session, the caller's tenant, the store,
and bounded reads of uploads and JSON parts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, TypeVar

from fastapi import Depends, Header, Request
from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session
from starlette.datastructures import FormData, UploadFile
from starlette.types import Message

from models_store import Store
from service.auth import authenticate
from service.errors import AfifError, BadRequest, InvalidInput, PayloadTooLarge, validation_problem
from service.models import Tenant
from service.settings import Settings

M = TypeVar("M", bound=BaseModel)

_CHUNK = 1024 * 1024
# Multipart framing (boundaries, part headers, the JSON parts) on top of the file itself.
_MULTIPART_SLACK = 1024 * 1024


def get_session(request: Request) -> Iterator[Session]:
    """A session for this request, closed (and rolled back if needed) afterwards."""
    session: Session = request.app.state.sessions()
    try:
        yield session
    finally:
        session.close()


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def current_tenant(
    session: Session = Depends(get_session),
    authorization: str | None = Header(None, description="Bearer <API key>"),
) -> Tenant:
    """The tenant that owns the presented API key (401 otherwise)."""
    return authenticate(session, authorization)


async def read_form(request: Request, settings: Settings) -> FormData:
    """The multipart form; past AFIF_MAX_UPLOAD_BYTES the body is refused with 413.

    The byte count is enforced while the body streams in (not only from Content-Length),
    so an oversized chunked upload is cut off rather than spooled to disk. The caller
    closes the returned form.
    """
    limit = settings.max_upload_bytes + _MULTIPART_SLACK
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise _too_large(int(length), settings)
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise BadRequest("expected a multipart/form-data body", field="content-type")

    received = 0

    async def bounded_receive() -> Message:
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise _too_large(received, settings)
        return message

    try:
        return await Request(request.scope, bounded_receive).form(max_files=4, max_fields=8)
    except AfifError:
        raise
    except Exception as exc:
        raise BadRequest(f"malformed multipart body: {exc}") from None


def _too_large(size: int, settings: Settings) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"upload of more than {size} bytes exceeds AFIF_MAX_UPLOAD_BYTES="
        f"{settings.max_upload_bytes}",
        field="file",
    )


async def read_file_part(form: FormData, name: str, limit: int, *, required: bool = True) -> bytes:
    """Bytes of the file part `name`, at most `limit` of them (413 beyond)."""
    part = form.get(name)
    if part is None:
        if required:
            raise InvalidInput(f"{name}: missing file part", field=name)
        return b""
    if not isinstance(part, UploadFile):
        raise InvalidInput(f"{name}: must be a file part, not a plain field", field=name)
    # Limitation: the whole upload (at most AFIF_MAX_UPLOAD_BYTES) is held in memory while it
    # is validated; safetensors and npz parsing want bytes, and the limit bounds the cost.
    chunks: list[bytes] = []
    size = 0
    while chunk := await part.read(_CHUNK):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(
                f"{name}: larger than AFIF_MAX_UPLOAD_BYTES={limit} bytes", field=name
            )
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json_part(form: FormData, name: str, schema: type[M], *, required: bool) -> M | None:
    """Parse the JSON part `name` (a plain field or a file part) against `schema`."""
    part = form.get(name)
    if part is None or part == "":
        if required:
            raise InvalidInput(f"{name}: missing part", field=name)
        return None
    raw: Any = await part.read(1024 * 1024 + 1) if isinstance(part, UploadFile) else part
    if isinstance(raw, bytes) and len(raw) > 1024 * 1024:
        raise PayloadTooLarge(f"{name}: a JSON part may be at most 1 MiB", field=name)
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"{name}: malformed JSON ({exc})", field=name) from None
    try:
        return schema.model_validate(value)
    except ValidationError as exc:
        field, detail = validation_problem(list(exc.errors()), prefix=name)
        raise InvalidInput(detail, field=field) from None
