"""The bad-input table: each case gets a 4xx problem naming what is wrong, and leaves no
rows and no stored files behind."""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save
from sqlalchemy import func, select

from models_store import LocalStore
from service.db import session_scope
from service.models import Artifact, Dataset, IdempotencyKey, Job, Model
from tests.service.helpers import breast_cancer, logreg_spec, logreg_weights, npz_file

X, Y = breast_cancer(40)


def _spec(**changes: Any) -> dict[str, Any]:
    return {**logreg_spec(), **changes}


def _raw_spec(api, text: str):
    files = {"weights": ("w.safetensors", logreg_weights())}
    return api.client.post("/v1/models", headers=api.h(), files=files, data={"spec": text})


def _torch_save_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"0.weight": torch.zeros(1, 30), "0.bias": torch.zeros(1)}, buffer)
    return buffer.getvalue()


def _object_npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, X=X, y=np.array([{"evil": 1}] * len(X), dtype=object))
    return buffer.getvalue()


def _job(api, ctx, kind="unlearning", **params: Any):
    body = {"kind": kind, "model_id": ctx["model_id"], "dataset_id": ctx["dataset_id"],
            "params": params}
    return api.submit(body, **{"Idempotency-Key": "bad-input"})


def _job_on(api, ctx, X_, y_, **extra: np.ndarray):
    dataset = api.post_dataset(npz_file(X=X_, y=y_, **extra))
    assert dataset.status_code == 201, dataset.text
    ctx["dataset_id"] = dataset.json()["id"]
    return ctx


Case = tuple[Callable[..., Any], int, str, str]

CASES: dict[str, Case] = {
    # --- models
    "malformed spec JSON": (lambda api, ctx: _raw_spec(api, '{"name": '), 400, "spec",
                            "malformed JSON"),
    "spec missing family": (
        lambda api, ctx: _raw_spec(api, json.dumps({k: v for k, v in logreg_spec().items()
                                                    if k != "family"})),
        422, "spec.family", "Field required"),
    "unknown family": (lambda api, ctx: api.post_model(spec=_spec(family="beta")), 422,
                       "spec.family", "bernoulli"),
    "pickle posing as safetensors": (
        lambda api, ctx: api.post_model(weights=pickle.dumps({"0.weight": [0.0] * 30})),
        422, "weights", "not a safetensors file"),
    "torch.save file posing as safetensors": (
        lambda api, ctx: api.post_model(weights=_torch_save_bytes()), 422, "weights",
        "not a safetensors file"),
    "weights for another architecture": (
        lambda api, ctx: api.post_model(weights=logreg_weights(d=10)), 422, "weights",
        "wrong shape"),
    "weights missing a tensor": (
        lambda api, ctx: api.post_model(weights=save({"0.weight": torch.zeros(1, 30)})),
        422, "weights", "missing: 0.bias"),
    "NaN in weights": (
        lambda api, ctx: api.post_model(
            weights=save({"0.weight": torch.full((1, 30), float("nan")),
                          "0.bias": torch.zeros(1)})),
        422, "weights", "NaN"),
    "unknown layer type": (
        lambda api, ctx: api.post_model(spec=_spec(architecture={"layers": [{"type": "magic"}]})),
        422, "spec.architecture", "magic"),
    "bernoulli with two outputs": (
        lambda api, ctx: api.post_model(spec=logreg_spec(out=2), weights=logreg_weights(out=2)),
        422, "spec.family", "1 output"),
    "unknown regularizer": (
        lambda api, ctx: api.post_model(spec=_spec(regularizer={"kind": "l7", "strength": 1})),
        422, "spec.regularizer", "l7"),
    "regularizer groups naming missing parameters": (
        lambda api, ctx: api.post_model(spec=_spec(regularizer={
            "kind": "group_lasso", "strength": 1, "groups": [["0.weight", "1.weight"],
                                                             ["2.bias"]]})),
        422, "spec.regularizer.groups", "'1.weight', '2.bias' are not parameters"),
    "a parameter in two groups": (
        lambda api, ctx: api.post_model(spec=_spec(regularizer={
            "kind": "group_lasso", "strength": 1, "groups": [["0.weight"], ["0.weight"]]})),
        422, "spec.regularizer.groups", "more than one group"),
    "groups for an l1 penalty": (
        lambda api, ctx: api.post_model(spec=_spec(regularizer={
            "kind": "l1", "strength": 1, "groups": [["0.weight"]]})),
        422, "spec.regularizer.groups", "group_lasso only"),
    "l1_ratio for an l2 penalty": (
        lambda api, ctx: api.post_model(spec=_spec(regularizer={
            "kind": "l2", "strength": 1, "l1_ratio": 0.5})),
        422, "spec.regularizer.l1_ratio", "elastic_net only"),
    "l1_ratio above one": (
        lambda api, ctx: api.post_model(spec=_spec(regularizer={
            "kind": "elastic_net", "strength": 1, "l1_ratio": 1.5})),
        422, "spec.regularizer.l1_ratio", "less than or equal to 1"),
    "exclude naming missing parameters": (
        lambda api, ctx: api.post_model(spec=_spec(regularizer={
            "kind": "l2", "strength": 1, "exclude": ["0.bias", "bias", "3.weight"]})),
        422, "spec.regularizer.exclude", "'bias', '3.weight' are not parameters"),
    "scope names a missing parameter": (
        lambda api, ctx: api.post_model(spec=_spec(scope=["1.weight"])), 422, "spec.scope",
        "1.weight"),
    "oversized weights": (
        lambda api, ctx: api.post_model(weights=save({"0.weight": torch.zeros(1, 30),
                                                      "0.bias": torch.zeros(1),
                                                      "pad": torch.zeros(20_000)})),
        413, "weights", "AFIF_MAX_UPLOAD_BYTES"),
    # --- datasets
    "pickle inside an npz": (lambda api, ctx: api.post_dataset(_object_npz()), 422, "file.y",
                             "pickle"),
    "pickle file posing as npz": (
        lambda api, ctx: api.post_dataset(pickle.dumps(np.zeros(3)), "d.npz"), 422, "file",
        "npz"),
    "NaN in X": (lambda api, ctx: api.post_dataset(npz_file(X=np.where(X > 2, np.nan, X), y=Y)),
                 422, "file.X", "NaN"),
    "y of the wrong length": (lambda api, ctx: api.post_dataset(npz_file(X=X, y=Y[:-1])), 422,
                              "file.y", "match X"),
    "one-dimensional X": (lambda api, ctx: api.post_dataset(npz_file(X=X[:, 0], y=Y)), 422,
                          "file.X", "shape"),
    "npz without y": (lambda api, ctx: api.post_dataset(npz_file(X=X)), 422, "file.y", "'y'"),
    "oversized dataset": (
        lambda api, ctx: api.post_dataset(npz_file(X=np.zeros((3000, 30)), y=np.zeros(3000))),
        413, "file", "AFIF_MAX_UPLOAD_BYTES"),
    "csv without meta": (lambda api, ctx: api.post_dataset(b"a,b\n1,2\n", "d.csv"), 422,
                         "meta.target", "target"),
    "csv naming a missing column": (
        lambda api, ctx: api.post_dataset(b"a,b\n1,0\n2,1\n", "d.csv",
                                          meta={"target": "b", "features": ["zz"]}),
        422, "meta.features", "'zz'"),
    "csv with text features": (
        lambda api, ctx: api.post_dataset(b"a,b\nx,0\ny,1\n", "d.csv", meta={"target": "b"}),
        422, "meta.features", "numeric"),
    "malformed meta JSON": (
        lambda api, ctx: api.client.post("/v1/datasets", headers=api.h(),
                        files={"file": ("d.npz", npz_file(X=X, y=Y))}, data={"meta": "{oops"}),
        400, "meta", "malformed JSON"),
    # --- jobs
    "unknown model id": (
        lambda api, ctx: _job(api, {**ctx, "model_id": "nope"}, remove=[0]), 404, "model_id",
        "nope"),
    "unknown dataset id": (
        lambda api, ctx: _job(api, {**ctx, "dataset_id": "nope"}, remove=[0]), 404,
        "dataset_id", "nope"),
    "remove out of range": (lambda api, ctx: _job(api, ctx, remove=[0, 40]), 422,
                            "params.remove", "out of range"),
    "negative remove index": (lambda api, ctx: _job(api, ctx, remove=[-1]), 422,
                              "params.remove[0]", "greater than or equal"),
    "duplicate remove index": (lambda api, ctx: _job(api, ctx, remove=[3, 3]), 422,
                               "params", "distinct"),
    "unknown solver": (lambda api, ctx: _job(api, ctx, remove=[0], solver="magic"), 422,
                       "params.solver", "lissa"),
    "misspelt param": (lambda api, ctx: _job(api, ctx, remove=[0], refine=2), 422,
                       "params.refine", "Extra inputs"),
    "unknown kind": (lambda api, ctx: _job(api, ctx, kind="retrain", remove=[0]), 422, "kind",
                     "unlearning"),
    "labels that do not fit bernoulli": (
        lambda api, ctx: _job(api, _job_on(api, ctx, X, np.arange(len(X)) % 3), remove=[0]),
        422, "dataset_id", "0/1"),
    "real labels for bernoulli": (
        lambda api, ctx: _job(api, _job_on(api, ctx, X, Y + 0.5), remove=[0]), 422,
        "dataset_id", "0/1"),
    "input width mismatch": (
        lambda api, ctx: _job(api, _job_on(api, ctx, X[:, :10], Y), remove=[0]), 422,
        "dataset_id", "expects [30]"),
    "fairness without sensitive": (
        lambda api, ctx: _job(api, ctx, kind="fairness", metric="chi2"), 422, "dataset_id",
        "sensitive"),
    "test_indices out of range": (
        lambda api, ctx: _job(api, ctx, kind="attribution", test_dataset_id=ctx["dataset_id"],
                              test_indices=[0, 99]),
        422, "params.test_indices", "out of range"),
    "unknown test dataset": (
        lambda api, ctx: _job(api, ctx, kind="attribution", test_dataset_id="nope"), 404,
        "params.test_dataset_id", "nope"),
    "cv k as large as the data": (lambda api, ctx: _job(api, ctx, kind="cv", k=40), 422,
                                  "params.k", "smaller"),
    "cv with more folds than rows": (lambda api, ctx: _job(api, ctx, kind="cv", folds=41), 422,
                                     "params.folds", "at least as many rows"),
    "malformed job JSON": (
        lambda api, ctx: api.client.post("/v1/jobs", content=b'{"kind": "cv",',
                                         headers=api.h(**{"Content-Type": "application/json"})),
        400, "body", "malformed JSON"),
}

def _chunked_oversized_upload(api, ctx):
    # No Content-Length: the limit must hold while the body streams in.
    boundary = "afifboundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="d.npz"\r\nContent-Type: application/octet-stream\r\n\r\n').encode()
    body = head + b"0" * (1536 * 1024) + f"\r\n--{boundary}--\r\n".encode()

    def chunks():
        for start in range(0, len(body), 65536):
            yield body[start:start + 65536]

    headers = api.h(**{"Content-Type": f"multipart/form-data; boundary={boundary}"})
    return api.client.post("/v1/datasets", headers=headers, content=chunks())


def _npz_bomb(api, ctx):
    buffer = io.BytesIO()
    np.savez_compressed(buffer, X=np.zeros((20_000, 30)), y=np.zeros(20_000))
    assert len(buffer.getvalue()) < 64 * 1024  # small on the wire, 5 MB inflated
    return api.post_dataset(buffer.getvalue())


CASES["npz decompression bomb"] = (_npz_bomb, 413, "file", "expand to")
CASES["architecture larger than its weights"] = (
    lambda api, ctx: api.post_model(
        spec=_spec(architecture={"layers": [{"type": "linear", "in_features": 30,
                                             "out_features": 100_000}]})),
    422, "spec.architecture", "parameters")
CASES["oversized chunked upload"] = (_chunked_oversized_upload, 413, "file",
                                     "AFIF_MAX_UPLOAD_BYTES")


def _on_model(api, ctx, **spec_changes: Any):
    """ctx with a (legitimate) model of another family or regularizer."""
    spec = _spec(**spec_changes)
    layer = spec["architecture"]["layers"][0]
    weights = logreg_weights(d=layer["in_features"], out=layer["out_features"], seed=1)
    ctx["model_id"] = api.model_id(spec=spec, weights=weights)
    return ctx


SENSITIVE = np.arange(len(X)) % 2


# Jobs that would fail in the worker are refused at submission instead.
CASES.update({
    "hessian with an l1 penalty": (
        lambda api, ctx: _job(api, _on_model(api, ctx, regularizer={"kind": "l1",
                                                                    "strength": 0.01}),
                              remove=[0], method="hessian"),
        422, "params.method", "smooth"),
    "hessian with group lasso": (
        lambda api, ctx: _job(api, _on_model(api, ctx, regularizer={"kind": "group_lasso",
                                                                    "strength": 0.01}),
                              kind="cv", folds=2, method="hessian"),
        422, "params.method", "group_lasso"),
    "hessian with elastic net": (
        lambda api, ctx: _job(api, _on_model(api, ctx, regularizer={"kind": "elastic_net",
                                                                    "strength": 0.01}),
                              kind="cv", folds=2, method="hessian"),
        422, "params.method", "elastic_net"),
    "cv with one fold": (lambda api, ctx: _job(api, ctx, kind="cv", folds=1), 422,
                         "params.folds", "at least 2"),
    "cv folds of k rows beyond the data": (
        lambda api, ctx: _job(api, ctx, kind="cv", k=10, folds=5), 422, "params.folds",
        "50 rows"),
    "leave-one-out over more rows than the fold cap": (
        # One feature keeps the 1040 rows under the upload limit.
        lambda api, ctx: _job(api, _job_on(api, _on_model(api, ctx, architecture={"layers": [
            {"type": "linear", "in_features": 1, "out_features": 1}]}),
            np.tile(X[:, :1], (26, 1)), np.tile(Y, 26)), kind="cv", folds=None),
        422, "params.folds", "set k >= 2"),
    "parity for a regression model": (
        lambda api, ctx: _job(api, _job_on(api, _on_model(api, ctx, family="gaussian"), X,
                                           Y.astype(np.float32), sensitive=SENSITIVE),
                              kind="fairness", metric="demographic_parity"),
        422, "params.metric", "binary classifier"),
    "parity for a 3-class model": (
        lambda api, ctx: _job(api, _job_on(api, _on_model(
            api, ctx, family="categorical",
            architecture={"layers": [{"type": "linear", "in_features": 30, "out_features": 3}]}),
            X, Y, sensitive=SENSITIVE), kind="fairness"),
        422, "params.metric", "2 outputs"),
    "parity with a three-valued sensitive column": (
        lambda api, ctx: _job(api, _job_on(api, ctx, X, Y, sensitive=np.arange(len(X)) % 3),
                              kind="fairness", metric="demographic_parity"),
        422, "dataset_id", "exactly two values"),
})

# Uploading the helper dataset for label/width cases adds one legitimate dataset row+file.
ADDS_A_DATASET = {"labels that do not fit bernoulli", "real labels for bernoulli",
                  "input width mismatch", "parity for a regression model",
                  "parity for a 3-class model", "parity with a three-valued sensitive column",
                  "leave-one-out over more rows than the fold cap"}
# Likewise one legitimate model row+file.
ADDS_A_MODEL = {"hessian with an l1 penalty", "hessian with group lasso",
                "hessian with elastic net", "parity for a regression model",
                "parity for a 3-class model", "leave-one-out over more rows than the fold cap"}


def _counts(api) -> dict[str, int]:
    with session_scope(api.url) as session:
        counts = {
            table.__name__: session.scalar(select(func.count()).select_from(table))
            for table in (Model, Dataset, Job, IdempotencyKey, Artifact)
        }
    counts["files"] = LocalStore(api.data_dir / "store").count()
    return counts


@pytest.fixture()
def ctx(api):
    model_id = api.model_id()
    response = api.post_dataset(npz_file(X=X, y=Y))
    return {"model_id": model_id, "dataset_id": response.json()["id"]}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_cleanly(api, ctx, case):
    action, status, field, words = CASES[case]
    before = _counts(api)

    response = action(api, ctx)

    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["status"] == status and problem["title"]
    if field:
        assert problem.get("field") == field, problem
    assert words.lower() in problem["detail"].lower(), problem
    after = _counts(api)
    if case in ADDS_A_DATASET:
        before["Dataset"] += 1
        before["files"] += 1
    if case in ADDS_A_MODEL:
        before["Model"] += 1
        before["files"] += 1
    assert after == before
    assert api.enqueued.calls == []
