"""Local folder store addressed by sha256 (hex): put / get / open / delete / exists."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

logger = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1024 * 1024


class StoreError(Exception):
    """Base of the store's errors."""


class BlobNotFound(StoreError, KeyError):
    """No blob with that sha256."""


class CorruptBlob(StoreError):
    """A blob's bytes no longer hash to its name."""


@dataclass(frozen=True)
class StoredBlob:
    """Outcome of a put: the digest, the size in bytes, and whether this call created it."""

    sha256: str
    size: int
    created: bool


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def _check_digest(sha256: str) -> str:
    if not isinstance(sha256, str) or not _SHA256.match(sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    return sha256


class Store(Protocol):
    """What the service needs from a blob store (a local folder or an S3 bucket)."""

    # Limitation: only LocalStore exists; an S3 backend would implement these five methods.

    def put(self, data: bytes) -> StoredBlob: ...

    def get(self, sha256: str, verify: bool = True) -> bytes: ...

    def open(self, sha256: str) -> BinaryIO: ...

    def delete(self, sha256: str) -> bool: ...

    def exists(self, sha256: str) -> bool: ...


class LocalStore:
    """Blobs under `root/ab/cd/<sha256>`, written atomically (temp file, fsync, rename)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        """Where the blob `sha256` lives (whether or not it exists)."""
        digest = _check_digest(sha256)
        return self.root / digest[:2] / digest[2:4] / digest

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put(self, data: bytes) -> StoredBlob:
        """Store `data`; a blob already present is left as is (same bytes, same name)."""
        digest = sha256_bytes(data)
        target = self.path(digest)
        if target.is_file():
            return StoredBlob(digest, len(data), created=False)

        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        logger.debug("stored blob %s (%d bytes)", digest, len(data))
        return StoredBlob(digest, len(data), created=True)

    def get(self, sha256: str, verify: bool = True) -> bytes:
        """The blob's bytes; with `verify`, raise CorruptBlob if they do not hash to `sha256`."""
        try:
            data = self.path(sha256).read_bytes()
        except FileNotFoundError:
            raise BlobNotFound(sha256) from None
        if verify and sha256_bytes(data) != sha256:
            raise CorruptBlob(f"blob {sha256} does not match its digest")
        return data

    def open(self, sha256: str) -> BinaryIO:
        """A binary file object for streaming the blob (not verified; the caller closes it)."""
        try:
            return self.path(sha256).open("rb")
        except FileNotFoundError:
            raise BlobNotFound(sha256) from None

    def delete(self, sha256: str) -> bool:
        """Remove the blob; True if it existed."""
        target = self.path(sha256)
        try:
            target.unlink()
        except FileNotFoundError:
            return False
        logger.debug("deleted blob %s", sha256)
        return True

    def count(self) -> int:
        """Number of blobs held (tests and operators)."""
        return sum(1 for p in self.root.glob("*/*/*") if p.is_file() and _SHA256.match(p.name))
