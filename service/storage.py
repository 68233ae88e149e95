"""The process's blob store, chosen from settings (a local folder under AFIF_DATA_DIR)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from models_store import LocalStore
from service.settings import get_settings


@lru_cache(maxsize=8)
def _store_at(root: str) -> LocalStore:
    return LocalStore(Path(root))


def get_store() -> LocalStore:
    """The LocalStore at settings.store_dir (one instance per folder)."""
    return _store_at(str(get_settings().store_dir.resolve()))
