"""Dataset uploads (.npz, .csv, .parquet) and their normalized stored form."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd

from models_store import LocalStore
from tests.service.helpers import breast_cancer, npz_file


def _stored(api, dataset_id: str) -> dict[str, np.ndarray]:
    sha = api.client.get(f"/v1/datasets/{dataset_id}", headers=api.h()).json()["sha256"]
    data = LocalStore(api.data_dir / "store").get(sha)
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {k: archive[k] for k in archive.files}


def test_npz_upload_is_stored_normalized(api):
    X, y = breast_cancer(50)
    sensitive = (X[:, 0] > 0).astype(np.int32)
    response = api.post_dataset(npz_file(X=X.astype(np.float64), y=y.astype(np.float64),
                                         sensitive=sensitive), meta={"name": "bc"})

    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["n_rows"], body["n_features"], body["name"]) == (50, 30, "bc")
    assert body["has_sensitive"] is True
    stored = _stored(api, body["id"])
    assert stored["X"].dtype == np.float32 and stored["X"].shape == (50, 30)
    np.testing.assert_array_equal(stored["X"], X)
    np.testing.assert_array_equal(stored["y"], y)
    assert stored["y"].dtype == np.int64
    np.testing.assert_array_equal(stored["sensitive"], sensitive)


def test_image_shaped_X_keeps_its_shape(api):
    X = np.random.default_rng(0).random((10, 1, 4, 4)).astype(np.float32)
    response = api.post_dataset(npz_file(X=X, y=np.arange(10) % 3))
    assert response.status_code == 201, response.text
    assert response.json()["feature_shape"] == [1, 4, 4]
    assert response.json()["n_features"] == 16


def test_csv_upload_with_meta_as_file_part(api):
    X, y = breast_cancer(40)
    frame = pd.DataFrame(X[:, :3], columns=["a", "b", "c"])
    frame["label"] = y
    frame["group"] = np.arange(40) % 2
    meta = {"name": "table", "features": ["a", "c"], "target": "label", "sensitive": "group"}

    response = api.post_dataset(frame.to_csv(index=False).encode(), "t.csv", meta=meta,
                                meta_as_file=True)

    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["n_rows"], body["n_features"], body["source_format"]) == (40, 2, "csv")
    stored = _stored(api, body["id"])
    np.testing.assert_allclose(stored["X"], X[:, [0, 2]], rtol=1e-6)
    np.testing.assert_array_equal(stored["y"], y)
    np.testing.assert_array_equal(stored["sensitive"], np.arange(40) % 2)


def test_parquet_upload_uses_all_other_columns_as_features(api):
    frame = pd.DataFrame({"x1": [0.5, 1.5, 2.5], "x2": [1.0, 2.0, 3.0], "t": [0.1, 0.2, 0.3]})
    buffer = io.BytesIO()
    frame.to_parquet(buffer)

    response = api.post_dataset(buffer.getvalue(), "t.parquet", meta={"target": "t"})

    assert response.status_code == 201, response.text
    stored = _stored(api, response.json()["id"])
    np.testing.assert_allclose(stored["X"], frame[["x1", "x2"]].to_numpy())
    assert stored["y"].dtype == np.float64
    np.testing.assert_allclose(stored["y"], [0.1, 0.2, 0.3])


def test_same_arrays_give_the_same_sha256(api):
    X, y = breast_cancer(20)
    first = api.post_dataset(npz_file(X=X, y=y)).json()
    second = api.post_dataset(npz_file(X=X.astype(np.float64), y=y)).json()
    assert first["sha256"] == second["sha256"] and first["id"] != second["id"]


def test_list_get_and_isolation(api):
    ids = [api.dataset_id(n=10 + i) for i in range(3)]

    page = api.client.get("/v1/datasets", params={"limit": 2}, headers=api.h()).json()
    assert [d["id"] for d in page["items"]] == ids[:0:-1]
    rest = api.client.get("/v1/datasets", params={"cursor": page["next_cursor"]},
                          headers=api.h()).json()
    assert [d["id"] for d in rest["items"]] == ids[:1]
    assert api.client.get(f"/v1/datasets/{ids[0]}", headers=api.h("bob")).status_code == 404
    assert json.loads(api.client.get("/v1/datasets", headers=api.h("bob")).text)["items"] == []
