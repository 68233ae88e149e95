"""Opaque keyset cursors over (created_at, id), newest first."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Any

from sqlalchemy import Select, and_, or_

from service.errors import InvalidInput

MAX_LIMIT = 100


def encode_cursor(created_at: datetime, row_id: str) -> str:
    """An opaque token pointing just after the row (created_at, row_id)."""
    raw = json.dumps([created_at.isoformat(), row_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Inverse of encode_cursor; a tampered token is a 422 naming `cursor`."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, row_id = json.loads(raw)
        return datetime.fromisoformat(created), str(row_id)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        raise InvalidInput("cursor is not a token this API issued", field="cursor") from None


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput(f"limit must be between 1 and {MAX_LIMIT}", field="limit")
    return limit


def paginate(stmt: Select[Any], entity: Any, limit: int, cursor: str | None) -> Select[Any]:
    """Order `stmt` newest first and start after `cursor`; fetch limit+1 to see a next page."""
    check_limit(limit)
    if cursor:
        created, row_id = decode_cursor(cursor)
        stmt = stmt.where(
            or_(
                entity.created_at < created,
                and_(entity.created_at == created, entity.id < row_id),
            )
        )
    return stmt.order_by(entity.created_at.desc(), entity.id.desc()).limit(limit + 1)


def page(rows: list[Any], limit: int) -> tuple[list[Any], str | None]:
    """Split limit+1 fetched rows into this page and the cursor of the next (or None)."""
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    last = rows[-1]
    return rows, encode_cursor(last.created_at, last.id)
