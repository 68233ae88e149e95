"""A throwaway runtime for worker tests: SQLite migrated to head and a real embedded
Redis, both under a temporary AFIF_DATA_DIR."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service import queue
from service.db import dispose_all, migrate
from service.settings import get_settings


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("AFIF_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    get_settings.cache_clear()
    migrate()
    try:
        yield tmp_path
    finally:
        queue.shutdown_embedded()
        dispose_all()
        get_settings.cache_clear()
