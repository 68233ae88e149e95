"""LocalStore: content addressing, idempotent puts, verification, atomic writes."""

from __future__ import annotations

import hashlib

import pytest

from models_store import BlobNotFound, CorruptBlob, LocalStore


@pytest.fixture()
def store(tmp_path):
    return LocalStore(tmp_path / "blobs")


def test_put_get_open_exists_delete(store):
    data = b"weights" * 1000
    blob = store.put(data)

    assert blob.sha256 == hashlib.sha256(data).hexdigest()
    assert (blob.size, blob.created) == (len(data), True)
    assert store.exists(blob.sha256)
    assert store.get(blob.sha256) == data
    with store.open(blob.sha256) as handle:
        assert handle.read() == data
    assert store.delete(blob.sha256) is True
    assert not store.exists(blob.sha256)
    assert store.delete(blob.sha256) is False
    with pytest.raises(BlobNotFound):
        store.get(blob.sha256)


def test_same_bytes_are_stored_once(store):
    first, second = store.put(b"abc"), store.put(b"abc")
    assert first.sha256 == second.sha256
    assert (first.created, second.created) == (True, False)
    assert store.count() == 1


def test_corruption_is_detected(store):
    blob = store.put(b"original bytes")
    store.path(blob.sha256).write_bytes(b"tampered bytes")

    with pytest.raises(CorruptBlob):
        store.get(blob.sha256)
    assert store.get(blob.sha256, verify=False) == b"tampered bytes"


def test_no_temporary_files_are_left(store):
    for i in range(5):
        store.put(bytes([i]) * 100)
    leftovers = [p for p in store.root.rglob(".tmp-*")]
    assert leftovers == [] and store.count() == 5


def test_names_must_be_digests(store):
    with pytest.raises(ValueError, match="sha256"):
        store.get("../../etc/passwd")
    with pytest.raises(ValueError):
        store.exists("ABC")
