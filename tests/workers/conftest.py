"""A throwaway runtime for worker tests: a fresh database (SQLite, then PostgreSQL via the
`database_url` fixture of tests/conftest.py) and a real embedded Redis, both reached through
the environment like a worker process does, under a temporary AFIF_DATA_DIR."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service import queue
from service.db import dispose_all
from service.settings import get_settings


@pytest.fixture
def runtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, database_url: str
) -> Iterator[Path]:
    """AFIF_DATA_DIR=tmp_path and DATABASE_URL=a fresh migrated database on each backend."""
    monkeypatch.setenv("AFIF_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.delenv("REDIS_URL", raising=False)
    get_settings.cache_clear()
    try:
        yield tmp_path
    finally:
        queue.shutdown_embedded()
        dispose_all()
        get_settings.cache_clear()
