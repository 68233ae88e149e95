"""Typed errors raised by the engine; callers map them to user-facing messages."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.solvers import SolveReport


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class SpecError(EngineError, ValueError):
    """Bad architecture, weights, labels, scope or option; the message names the culprit."""


class SolverDiverged(EngineError):
    """A linear solve diverged (non-finite values, growth, negative curvature).

    `report` is the `SolveReport` of the failed attempt; the iterate is never returned.
    """

    def __init__(self, message: str, report: SolveReport) -> None:
        super().__init__(message)
        self.report = report
