"""Content-addressed blob store: bytes in, sha256 out.

`LocalStore` keeps blobs in a local folder; `Store` is the interface an S3-compatible
backend would implement. The store knows nothing of databases or what the bytes mean.
"""

from models_store.store import (
    BlobNotFound,
    CorruptBlob,
    LocalStore,
    Store,
    StoredBlob,
    StoreError,
    sha256_bytes,
)

__all__ = [
    "BlobNotFound",
    "CorruptBlob",
    "LocalStore",
    "Store",
    "StoreError",
    "StoredBlob",
    "sha256_bytes",
]
