"""Python SDK of the afif service: `Client` talks HTTP, `Job` follows one job."""

from client.api import Client, Job
from client.errors import (
    AfifError,
    ApiError,
    Conflict,
    InvalidInput,
    JobCancelled,
    JobFailed,
    NotFound,
    ServiceUnavailable,
    Unauthorized,
    WaitTimeout,
)

__all__ = [
    "AfifError",
    "ApiError",
    "Client",
    "Conflict",
    "InvalidInput",
    "Job",
    "JobCancelled",
    "JobFailed",
    "NotFound",
    "ServiceUnavailable",
    "Unauthorized",
    "WaitTimeout",
]
