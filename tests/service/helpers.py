"""Small builders for service tests: a logistic-regression spec + weights, datasets, an app."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save
from sklearn.datasets import load_breast_cancer

from service.app import create_app
from service.settings import Settings
from tests.conftest import create_tenant_key

N_ROWS = 120  # a slice of breast_cancer keeps uploads and label checks fast


def breast_cancer(n: int = N_ROWS) -> tuple[np.ndarray, np.ndarray]:
    X, y = load_breast_cancer(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    return X[:n].astype(np.float32), y[:n].astype(np.int64)


def logreg_spec(d: int = 30, name: str = "logreg", family: str = "bernoulli",
                out: int = 1) -> dict[str, Any]:
    return {
        "name": name,
        "architecture": {"layers": [{"type": "linear", "in_features": d, "out_features": out}]},
        "family": family,
        "regularizer": {"kind": "l2", "strength": 0.01},
    }


def logreg_weights(d: int = 30, out: int = 1, seed: int = 0) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    return save({"0.weight": torch.randn(out, d, generator=gen), "0.bias": torch.zeros(out)})


def npz_file(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@dataclass
class Recorder:
    """Stands in for service.queue: remembers calls, can be told to fail."""

    calls: list[str] = field(default_factory=list)
    fail: bool = False

    def __call__(self, job_id: str) -> bool:
        if self.fail:
            raise ConnectionError("redis down (test)")
        self.calls.append(job_id)
        return True


@dataclass
class Api:
    client: TestClient
    url: str
    data_dir: Path
    enqueued: Recorder
    dropped: Recorder
    keys: dict[str, str]

    def h(self, tenant: str = "alice", **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[tenant]}", **extra}

    def post_model(self, spec: dict[str, Any] | None = None, weights: bytes | None = None,
                   tenant: str = "alice", spec_as_file: bool = False) -> Any:
        spec_text = json.dumps(spec if spec is not None else logreg_spec())
        files: dict[str, Any] = {"weights": ("w.safetensors", weights or logreg_weights())}
        data = {}
        if spec_as_file:
            files["spec"] = ("spec.json", spec_text.encode(), "application/json")
        else:
            data["spec"] = spec_text
        return self.client.post("/v1/models", headers=self.h(tenant), files=files, data=data)

    def post_dataset(self, content: bytes, filename: str = "d.npz",
                     meta: dict[str, Any] | None = None, tenant: str = "alice",
                     meta_as_file: bool = False) -> Any:
        files: dict[str, Any] = {"file": (filename, content)}
        data = {}
        if meta is not None:
            if meta_as_file:
                files["meta"] = ("meta.json", json.dumps(meta).encode(), "application/json")
            else:
                data["meta"] = json.dumps(meta)
        return self.client.post("/v1/datasets", headers=self.h(tenant), files=files, data=data)

    def model_id(self, **kwargs: Any) -> str:
        response = self.post_model(**kwargs)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def dataset_id(self, n: int = N_ROWS, tenant: str = "alice", **extra: np.ndarray) -> str:
        X, y = breast_cancer(n)
        response = self.post_dataset(npz_file(X=X, y=y, **extra), tenant=tenant)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def submit(self, body: dict[str, Any], tenant: str = "alice", **headers: str) -> Any:
        return self.client.post("/v1/jobs", headers=self.h(tenant, **headers), json=body)


def make_api(database_url: str, data_dir: Path, **settings: Any) -> Api:
    config = Settings(data_dir=data_dir, database_url=database_url, **settings)
    enqueued, dropped = Recorder(), Recorder()
    app = create_app(config, enqueue=enqueued, cancel_in_queue=dropped, redis_ping=lambda: True)
    keys = {name: create_tenant_key(database_url, name) for name in ("alice", "bob")}
    return Api(TestClient(app), database_url, data_dir, enqueued, dropped, keys)
