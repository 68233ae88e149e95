"""TaskResult helpers: the phase timer and the progress throttle."""

from __future__ import annotations

import time

import pytest

from engine.results import PhaseTimer, Progress


def test_phase_timer_accumulates_per_phase_and_records_failed_phases():
    timer = PhaseTimer()
    with timer.phase("solve"):
        time.sleep(0.01)
    with timer.phase("solve"):
        time.sleep(0.01)
    with pytest.raises(RuntimeError), timer.phase("scoring"):
        raise RuntimeError("boom")

    assert timer.timings["solve"] >= 0.02
    assert set(timer.timings) == {"solve", "scoring"}


def test_progress_passes_phase_changes_and_completions_and_drops_the_rest():
    calls = []
    progress = Progress(lambda *a: calls.append(a), min_interval=3600.0)

    for done in range(1000):
        progress("solve", done, 1000)
    progress("solve", 1000, 1000)
    progress("scoring", 0, 5)
    progress("scoring", 3, 5)

    assert calls == [("solve", 0, 1000), ("solve", 1000, 1000), ("scoring", 0, 5)]


def test_progress_without_callback_is_a_no_op():
    Progress(None)("solve", 1, 2)
