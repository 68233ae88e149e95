"""What every engine task returns, plus the phase timer and the progress throttle it uses."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

logger = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]

# Seconds between two progress reports of the same phase; the first and the last of a
# phase always go through, so a caller sees every phase start and finish.
PROGRESS_MIN_INTERVAL_S = 0.5


@dataclass
class TaskResult:
    """Outcome of one engine task.

    values: JSON-able scalars, short lists and diagnostics (scores state their
    `convention`). arrays: large numpy arrays (e.g. `scores`, n or n x m).
    parameters: full state dict of a new model (unlearning), else None.
    timings: wall seconds per phase. device: where it ran, e.g. "cpu".
    """

    values: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    parameters: dict[str, Tensor] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"


class PhaseTimer:
    """Accumulates wall time per named phase; `timings` maps phase -> seconds."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the enclosed block and add it to `timings[name]` (also on error)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.timings[name] = self.timings.get(name, 0.0) + elapsed
            logger.debug("phase %s took %.3f s", name, elapsed)


class Progress:
    """Forwards progress(phase, done, total) to a callback at a bounded rate.

    A report goes through when the phase changes, when done == total, or when at least
    `min_interval` seconds passed since the last one. A None callback does nothing.
    """

    def __init__(
        self, callback: ProgressFn | None, min_interval: float = PROGRESS_MIN_INTERVAL_S
    ) -> None:
        self._callback = callback
        self._min_interval = min_interval
        self._last_phase: str | None = None
        self._last_time = -float("inf")

    def __call__(self, phase: str, done: int, total: int) -> None:
        if self._callback is None:
            return

        now = time.monotonic()
        due = (
            phase != self._last_phase
            or done >= total
            or now - self._last_time >= self._min_interval
        )
        if not due:
            return

        self._last_phase = phase
        self._last_time = now
        self._callback(phase, int(done), int(total))
