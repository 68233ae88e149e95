"""Exceptions raised by the afif client SDK."""

from __future__ import annotations

from typing import Any


class AfifError(Exception):
    """Base class of every error the client raises."""


class ApiError(AfifError):
    """The server answered with an error (RFC 9457 problem details).

    `status` is the HTTP status, `title`/`detail` the server's words and `field` the
    offending input field when the server named one. `problem` holds the whole body.
    """

    def __init__(
        self,
        status: int,
        title: str,
        detail: str | None = None,
        field: str | None = None,
        problem: dict[str, Any] | None = None,
    ) -> None:
        self.status = status
        self.title = title
        self.detail = detail
        self.field = field
        self.problem = problem or {}
        text = f"{status} {title}"
        if detail:
            text += f": {detail}"
        if field:
            text += f" (field: {field})"
        super().__init__(text)


class NotFound(ApiError):
    """404: the resource does not exist or belongs to another tenant."""


class Unauthorized(ApiError):
    """401/403: missing, unknown or revoked API key."""


class InvalidInput(ApiError):
    """400/422: the server refused the request's content."""


class Conflict(ApiError):
    """409: e.g. the result of a job that has not succeeded."""


class ServiceUnavailable(ApiError):
    """503 (or a connection failure) that outlasted the client's retries."""


class JobFailed(AfifError):
    """A job ended `failed`; `code` and `message` are the server's."""

    def __init__(self, job_id: str, code: str, message: str) -> None:
        self.job_id = job_id
        self.code = code
        self.message = message
        super().__init__(f"job {job_id} failed ({code}): {message}")


class JobCancelled(AfifError):
    """A job ended `cancelled` before it produced a result."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id} was cancelled")


class WaitTimeout(AfifError):
    """`Job.wait(timeout=...)` ran out before the job reached a terminal status."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: InvalidInput,
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: InvalidInput,
    415: InvalidInput,
    422: InvalidInput,
    503: ServiceUnavailable,
}


def error_from_response(status: int, body: Any, reason: str = "") -> ApiError:
    """Build the typed error for an HTTP error answer (problem+json or anything else)."""
    problem: dict[str, Any] = body if isinstance(body, dict) else {}
    title = str(problem.get("title") or reason or "HTTP error")
    detail = problem.get("detail")
    if detail is None and "detail" not in problem and isinstance(body, str) and body:
        detail = body[:500]
    if detail is not None and not isinstance(detail, str):
        # FastAPI's own validation errors put a list here; keep it readable.
        detail = str(detail)
    field = problem.get("field")
    cls = _BY_STATUS.get(status, ApiError)
    return cls(status, title, detail, str(field) if field is not None else None, problem)
