from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.helpers import Api, make_api


@pytest.fixture()
def api(database_url: str, tmp_path: Path) -> Iterator[Api]:
    """The app on a fresh database and data dir, with recorders for the queue."""
    built = make_api(database_url, tmp_path / "data", max_upload_bytes=64 * 1024)
    with built.client:
        yield built
