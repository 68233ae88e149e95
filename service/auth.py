"""API keys: random tokens stored as sha256 digests; a key names its tenant."""

from __future__ import annotations

import hashlib
import logging
import secrets

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.errors import InvalidInput, Unauthorized
from service.models import ApiKey, Tenant

logger = logging.getLogger(__name__)

KEY_PREFIX = "afif_"


def hash_key(plaintext: str) -> str:
    """Hex sha256 of a key's plaintext (what the database keeps)."""
    return hashlib.sha256(plaintext.encode()).hexdigest()


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    """The tenant called `name`, created if new (committed)."""
    name = name.strip()
    if not name or len(name) > 200:
        raise InvalidInput("tenant name must be 1..200 characters", field="tenant")
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is not None:
        return tenant
    tenant = Tenant(name=name)
    session.add(tenant)
    try:
        session.commit()
    except IntegrityError:
        # Another process created it between our read and write.
        session.rollback()
        tenant = session.scalar(select(Tenant).where(Tenant.name == name))
        assert tenant is not None
    return tenant


def create_api_key(session: Session, tenant_name: str) -> str:
    """A new key for `tenant_name` (tenant created if new); returns the plaintext once."""
    tenant = get_or_create_tenant(session, tenant_name)
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant_id=tenant.id, key_hash=hash_key(plaintext), prefix=plaintext[:12]))
    session.commit()
    logger.info("created API key %s... for tenant %s", plaintext[:12], tenant.name)
    return plaintext


def authenticate(session: Session, authorization: str | None) -> Tenant:
    """The tenant of an `Authorization: Bearer <key>` header; Unauthorized otherwise."""
    if not authorization:
        raise Unauthorized("missing Authorization header (expected 'Bearer <key>')",
                           field="Authorization")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("Authorization must be 'Bearer <key>'", field="Authorization")

    row = session.scalar(
        select(ApiKey).where(ApiKey.key_hash == hash_key(token), ApiKey.revoked_at.is_(None))
    )
    if row is None:
        raise Unauthorized("unknown or revoked API key", field="Authorization")
    return row.tenant
