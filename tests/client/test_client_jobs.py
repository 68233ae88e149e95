"""Every job kind through the client against a running stack, checked against numpy
dense algebra for logistic regression (Fisher = Hessian of the data term for a GLM)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from client_fixtures import INLINE_MAX, LogReg, Registered

from client import Client, Conflict
from client.stack import LocalStack


def test_register_and_read_back(client: Client, registered: Registered, logreg: LogReg) -> None:
    model = client.get_model(registered.model.id)
    assert model.family == "bernoulli"
    assert model.n_parameters == logreg.X.shape[1] + 1
    assert model.parent_id is None
    assert registered.model.id in {m.id for m in client.list_models()}
    train = client.get_dataset(registered.train.id)
    assert (train.n_rows, train.n_features) == logreg.X.shape
    assert train.has_sensitive
    assert registered.test.id in {d.id for d in client.list_datasets()}


def test_download_model_gives_the_same_function(client: Client, registered: Registered,
                                                logreg: LogReg) -> None:
    module = client.download_model(registered.model.id)
    X = torch.as_tensor(logreg.X_test)
    assert torch.equal(module(X), logreg.module(X))


def test_attribution_matches_dense_influence(client: Client, registered: Registered,
                                             logreg: LogReg) -> None:
    job = client.submit("attribution", model=registered.model, dataset=registered.train,
                        test_dataset=registered.test, top_k=3, solver="exact")
    res = job.wait(progress=True, timeout=120).result()
    assert job.status == "succeeded"
    assert res["convention"] == "removal"

    n = len(logreg.y)
    grad_T = logreg.grads(logreg.X_test, logreg.y_test).mean(axis=0)
    s = np.linalg.solve(logreg.hessian(), grad_T)
    expected = logreg.grads(logreg.X, logreg.y) @ s / n
    scores = np.asarray(res["scores"], dtype=np.float64)
    assert scores.shape == (n,)
    assert np.abs(scores - expected).max() <= 1e-3 * np.abs(expected).max()

    # Per test row: scores_per_test (n, m) and the top_k most helpful rows of each.
    per_test = np.asarray(res["scores_per_test"], dtype=np.float64)
    G_test = logreg.grads(logreg.X_test, logreg.y_test)
    expected_pt = logreg.grads(logreg.X, logreg.y) @ np.linalg.solve(logreg.hessian(),
                                                                     G_test.T) / n
    assert per_test.shape == expected_pt.shape == (n, len(logreg.y_test))
    assert np.abs(per_test - expected_pt).max() <= 1e-3 * np.abs(expected_pt).max()
    helpful = np.asarray(res["helpful"])
    assert helpful.shape == (len(logreg.y_test), 3)
    for j in range(len(logreg.y_test)):
        top = set(np.argsort(-expected_pt[:, j])[:3].tolist())
        assert len(top & set(helpful[j].tolist())) >= 2

    # n scores exceed AFIF_INLINE_MAX: the server stored them as an artifact, and
    # result() downloaded it transparently.
    raw = job.raw_result()
    assert n > INLINE_MAX and set(raw["scores"]) >= {"artifact", "shape", "dtype"}
    assert isinstance(res["scores"], np.ndarray)


def test_unlearning_makes_a_child_model(client: Client, registered: Registered,
                                        logreg: LogReg) -> None:
    remove = [3, 17, 42, 99]
    job = client.submit("unlearning", model=registered.model, dataset=registered.train,
                        remove=np.array(remove), solver="exact")
    res = job.wait(timeout=120).result()
    assert res["n_removed"] == len(remove)

    n = len(logreg.y)
    step = np.linalg.solve(logreg.hessian(), logreg.grads(logreg.X[remove], logreg.y[remove])
                           .sum(axis=0)) / n
    child = client.download_model(res["model_id"])
    got = torch.cat([p.detach().double().ravel() for p in child.parameters()]).numpy()
    np.testing.assert_allclose(got - logreg.theta, step, atol=1e-4 * np.abs(step).max() + 1e-6)
    assert res["parameter_change_norm"] == pytest.approx(np.linalg.norm(step), rel=1e-2)

    info = client.get_model(res["model_id"])
    assert info.parent_id == registered.model.id
    assert sorted(info.removed_indices or []) == remove


def test_fairness_reports_the_parity_gap(client: Client, registered: Registered,
                                         logreg: LogReg) -> None:
    job = client.submit("fairness", model=registered.model, dataset=registered.train,
                        metric="demographic_parity", unlearn=True, solver="exact")
    res = job.wait(timeout=120).result()

    p, s = logreg.probs(logreg.X), logreg.s
    gap = abs(p[s == 1].mean() - p[s == 0].mean())
    assert res["metric_before"] == pytest.approx(gap, abs=1e-4)
    assert len(np.asarray(res["scores"]).reshape(len(logreg.y), -1)) == len(logreg.y)
    if res["n_removed"] > 0:
        assert res["metric_after"] < res["metric_before"]
        child = client.get_model(res["model_id"])
        assert child.parent_id == registered.model.id
        assert sorted(child.removed_indices or []) == sorted(np.asarray(res["removed"]).tolist())


@pytest.mark.parametrize("folds", [4, 2])
def test_cv_matches_plug_in_newton_folds(client: Client, registered: Registered,
                                         logreg: LogReg, folds: int) -> None:
    job = client.submit("cv", model=registered.model, dataset=registered.train, folds=folds,
                        seed=1, solver="exact")
    res = job.wait(timeout=120).result()
    fold_rows = len(logreg.y) // folds
    # Folds above AFIF_INLINE_MAX rows reference their indices as an artifact, which
    # result() downloads; smaller folds list them inline.
    raw = job.raw_result()
    inline = fold_rows <= INLINE_MAX
    assert all(isinstance(f["indices"], list) == inline for f in raw["per_fold"])
    assert all(isinstance(f["indices"], np.ndarray) for f in res["per_fold"])

    n = len(logreg.y)
    H = logreg.hessian()
    G = logreg.grads(logreg.X, logreg.y)
    seen: list[int] = []
    for fold in res["per_fold"]:
        idx = np.asarray(fold["indices"], dtype=np.int64)
        seen.extend(idx.tolist())
        theta_minus = logreg.theta + np.linalg.solve(H, G[idx].sum(axis=0)) / n
        expected = logreg.loss(logreg.X[idx], logreg.y[idx], theta_minus).mean()
        assert fold["loss"] == pytest.approx(expected, rel=1e-3)
    assert len(res["per_fold"]) == folds
    assert sorted(seen) == list(range(n))  # the folds partition the training rows
    assert res["estimate"] == pytest.approx(np.mean([f["loss"] for f in res["per_fold"]]),
                                            rel=1e-6)


def test_list_jobs_filters_and_pages(client: Client, registered: Registered) -> None:
    for _ in range(3):
        client.submit("cv", model=registered.model, dataset=registered.train, folds=2)
    jobs = client.list_jobs(kind="cv", limit=2)  # pages of 2, followed to the end
    assert len(jobs) >= 3 and all(j.kind == "cv" for j in jobs)
    assert len({j.id for j in jobs}) == len(jobs)
    for job in jobs:
        job.wait(timeout=120, raise_on_failure=False)


def test_dataset_from_a_pandas_frame(client: Client, logreg: LogReg) -> None:
    import pandas as pd

    frame = pd.DataFrame(logreg.X[:, :5], columns=[f"f{i}" for i in range(5)])
    frame["label"] = logreg.y
    frame["group"] = logreg.s
    ds = client.register_dataset(frame, "label", "group", name="frame")
    assert (ds.n_rows, ds.n_features) == (len(logreg.y), 5)  # label and group left out
    assert ds.has_sensitive


def test_csv_upload_through_the_cli(client: Client, logreg: LogReg, tmp_path: Path,
                                    stack: LocalStack, capsys: pytest.CaptureFixture[str]
                                    ) -> None:
    import pandas as pd

    from client.cli import main

    path = tmp_path / "rows.csv"
    frame = pd.DataFrame({"a": logreg.X[:, 0], "b": logreg.X[:, 1], "y": logreg.y})
    frame.to_csv(path, index=False)
    code = main(["datasets", "upload", str(path), "--features", "a,b", "--target", "y",
                 "--url", stack.url, "--key", stack.key, "--output", "json"])
    assert code == 0
    ds = client.get_dataset(json.loads(capsys.readouterr().out)["id"])
    assert (ds.n_rows, ds.n_features, ds.source_format) == (len(logreg.y), 2, "csv")


def test_cancel_of_a_finished_job_is_a_conflict(client: Client, registered: Registered
                                                ) -> None:
    job = client.submit("cv", model=registered.model, dataset=registered.train, folds=2)
    job.wait(timeout=120)
    with pytest.raises(Conflict) as info:
        job.cancel()
    assert info.value.status == 409 and "succeeded" in str(info.value.detail)
