"""Domain errors and the one handler that turns them into RFC 9457 problem details."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


class AfifError(Exception):
    """A failure a caller can act on: an HTTP status, a title, a detail and maybe a field."""

    status: int = 500
    title: str = "Internal error"
    code: str = "internal"

    def __init__(self, detail: str, *, field: str | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field
        self.extra = extra


class BadRequest(AfifError):
    status, title, code = 400, "Bad request", "bad_request"


class Unauthorized(AfifError):
    status, title, code = 401, "Unauthorized", "unauthorized"


class NotFound(AfifError):
    status, title, code = 404, "Not found", "not_found"


class Conflict(AfifError):
    status, title, code = 409, "Conflict", "conflict"


class PayloadTooLarge(AfifError):
    status, title, code = 413, "Payload too large", "payload_too_large"


class InvalidInput(AfifError):
    """Well-formed but unacceptable input (shapes, values, labels, indices...)."""

    status, title, code = 422, "Invalid input", "invalid_input"


class JobStateError(Conflict):
    """The job is not in a state that allows the operation."""

    code = "job_state"


class ServiceUnavailable(AfifError):
    status, title, code = 503, "Service unavailable", "unavailable"


def problem_response(
    status: int,
    title: str,
    detail: str,
    *,
    field: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """A problem-details response; `field` names the offending input when there is one."""
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    body["detail"] = detail
    if field is not None:
        body["field"] = field
    body.update({k: v for k, v in extra.items() if v is not None})
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _loc_to_field(loc: tuple[Any, ...] | list[Any]) -> str:
    # ("body", "params", "remove", 3) -> "params.remove[3]"; the "body"/"query" root is noise.
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header", "form"):
        parts = parts[1:]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


def validation_problem(errors: list[Any], prefix: str | None = None) -> tuple[str, str]:
    """(field, detail) from pydantic's error list; `prefix` names the enclosing part."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid"}
    field = _loc_to_field(tuple(first.get("loc", ())))
    if prefix:
        field = prefix if field == "body" else f"{prefix}.{field}"
    details = []
    for err in errors[:5]:
        where = _loc_to_field(tuple(err.get("loc", ())))
        if prefix:
            where = prefix if where == "body" else f"{prefix}.{where}"
        details.append(f"{where}: {err.get('msg', 'invalid')}")
    return field, "; ".join(details)


async def _afif_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AfifError)
    if exc.status >= 500:
        logger.error("%s: %s", exc.title, exc.detail)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return problem_response(
        exc.status, exc.title, exc.detail, field=exc.field, headers=headers,
        code=exc.code, **exc.extra,
    )


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    broken = [e for e in errors if e.get("type") == "json_invalid"]
    if broken:
        # Undecodable JSON is a malformed request (400); decodable but off-schema is a 422.
        loc = list(broken[0].get("loc", ()))
        where = f" at character {loc[-1]}" if loc and isinstance(loc[-1], int) else ""
        reason = (broken[0].get("ctx") or {}).get("error", "JSON decode error")
        detail = f"body: malformed JSON{where} ({reason})"
        return problem_response(400, "Malformed request", detail, field="body",
                                code="invalid_input")
    field, detail = validation_problem(errors)
    status = 422
    title = "Malformed request" if status == 400 else "Invalid input"
    return problem_response(status, title, detail, field=field, code="invalid_input")


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    title = {404: "Not found", 405: "Method not allowed", 401: "Unauthorized"}.get(
        exc.status_code, "HTTP error"
    )
    return problem_response(
        exc.status_code, title, str(exc.detail), headers=getattr(exc, "headers", None)
    )


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error: %s", exc)
    return problem_response(500, "Internal error", "An unexpected error occurred.")


def install_handlers(app: FastAPI) -> None:
    """Route every error through problem details."""
    app.add_exception_handler(AfifError, _afif_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
