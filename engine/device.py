"""Where the engine computes: CUDA when available, else CPU."""

from __future__ import annotations

import logging

import torch

from engine.errors import SpecError

logger = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """None or "auto" -> cuda if available else cpu; "cuda" without a GPU -> SpecError."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise SpecError(f"unknown device {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise SpecError("device 'cuda' requested but no CUDA device is available")
    return resolved
