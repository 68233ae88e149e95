"""Registration is all or nothing: a database failure after the store write leaves no
orphan file, and a blob another row uses is never deleted."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from models_store import LocalStore
from service import schemas
from service.auth import get_or_create_tenant
from service.domain import datasets, models
from service.models import Dataset, Model
from tests.service.helpers import breast_cancer, logreg_spec, logreg_weights, npz_file


def _failing_commit(session, monkeypatch):
    def boom() -> None:
        raise OperationalError("COMMIT", {}, Exception("database went away (test)"))

    monkeypatch.setattr(session, "commit", boom)


def test_model_row_failure_removes_the_new_file(db_session, tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "store")
    tenant = get_or_create_tenant(db_session, "alice")
    _failing_commit(db_session, monkeypatch)

    with pytest.raises(OperationalError):
        models.register_model(db_session, tenant, schemas.ModelCreate(**logreg_spec()),
                              logreg_weights(), store)

    assert store.count() == 0
    assert db_session.scalar(select(func.count()).select_from(Model)) == 0


def test_dataset_row_failure_keeps_a_blob_another_row_uses(db_session, tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "store")
    tenant = get_or_create_tenant(db_session, "alice")
    X, y = breast_cancer(30)
    first = datasets.register_dataset(db_session, tenant, "a.npz", npz_file(X=X, y=y), None,
                                      store)
    _failing_commit(db_session, monkeypatch)

    with pytest.raises(OperationalError):
        datasets.register_dataset(db_session, tenant, "b.npz", npz_file(X=X, y=y), None, store)
    with pytest.raises(OperationalError):
        datasets.register_dataset(db_session, tenant, "c.npz", npz_file(X=X[:20], y=y[:20]),
                                  None, store)

    assert store.exists(first.sha256) and store.count() == 1
    assert db_session.scalar(select(func.count()).select_from(Dataset)) == 1
