"""Every job kind end to end over HTTP on a real stack (`afif up`: embedded Redis, API,
two worker processes, reconciler), with numbers checked against scikit-learn refits."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from tests.integration.stack import (
    ENDLESS_PARAMS,
    Fitted,
    Stack,
    Uploaded,
    distance,
    download_weights,
    fetch_array,
    fit_logreg,
    influence_step,
    log_loss,
    result_of,
    sigmoid,
    submit,
    wait_for,
)

pytestmark = pytest.mark.integration

# Results seen during the module, re-read after the stack restarts (last test).
SEEN: dict[str, dict[str, Any]] = {}


def test_unlearning_one_step_and_refined(
    alice: httpx.Client, fitted: Fitted, uploaded: Uploaded
) -> None:
    remove = sorted(np.random.default_rng(1).choice(fitted.n, size=12, replace=False).tolist())
    one = submit(alice, "unlearning", uploaded, remove=remove, method="fisher", solver="exact")
    refined = submit(alice, "unlearning", uploaded, remove=remove, method="fisher",
                     solver="cg", refine_steps=2)
    one_result, refined_result = result_of(alice, one["id"]), result_of(alice, refined["id"])
    SEEN[one["id"]], SEEN[refined["id"]] = one_result, refined_result

    keep = np.setdiff1d(np.arange(fitted.n), remove)
    retrained = fit_logreg(fitted.X[keep], fitted.y[keep])
    original = (fitted.coef, fitted.intercept)
    baseline = distance(original, retrained)

    # One step is the influence-function update, computed here with dense numpy algebra.
    stepped = download_weights(alice, one_result["model_id"])
    expected = influence_step(fitted, remove)
    assert distance(stepped, expected) < 1e-4 * baseline
    assert distance(stepped, retrained) < 0.5 * baseline
    assert one_result["n_removed"] == len(remove)
    solves = one_result["solver"]["solves"]
    assert solves and all(solve["converged"] for solve in solves)
    assert one_result["converged"] is True
    assert one_result["max_relative_residual"] == max(s["relative_residual"] for s in solves)
    assert one_result["parameter_change_norm"] == pytest.approx(
        distance(stepped, original), rel=1e-3
    )

    # Refinement steps on the reduced objective land on scikit-learn's exact refit.
    polished = download_weights(alice, refined_result["model_id"])
    assert distance(polished, retrained) < 1e-3 * baseline

    for result in (one_result, refined_result):
        record = alice.get(f"/v1/models/{result['model_id']}").json()
        assert record["parent_id"] == uploaded.model["id"]
        assert record["removed_indices"] == remove
    finished = alice.get(f"/v1/jobs/{one['id']}").json()
    assert finished["device"] == "cpu" and finished["timings"]
    assert finished["versions"]["torch"] == torch.__version__ and finished["attempts"] == 1
    assert finished["started_at"] and finished["finished_at"]


def test_attribution_predicts_leave_one_out_refits(
    alice: httpx.Client, fitted: Fitted, uploaded: Uploaded
) -> None:
    job = submit(
        alice, "attribution", uploaded, test_dataset_id=uploaded.test["id"], top_k=5,
        solver="exact",
    )
    result = result_of(alice, job["id"])
    SEEN[job["id"]] = result
    # AFIF_INLINE_MAX is 100 in this stack: 400 scores must come as an .npy artifact.
    assert set(result["scores"]) == {"artifact", "shape", "dtype"}
    scores = fetch_array(alice, result["scores"]).astype(np.float64).ravel()
    missing = alice.get(f"/v1/jobs/{job['id']}/artifacts/nope")
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("application/problem+json")
    assert scores.shape == (fitted.n,)
    assert result["convention"] == "removal"

    # Oracle: refit without row i, change of the mean test loss (removal convention).
    base = log_loss(fitted.X_test, fitted.y_test, fitted.coef, fitted.intercept)
    rows = np.unique(np.concatenate([
        np.argsort(-np.abs(scores))[:8], np.random.default_rng(2).choice(fitted.n, 8),
    ]))
    actual = []
    for i in rows:
        keep = np.arange(fitted.n) != i
        coef, intercept = fit_logreg(fitted.X[keep], fitted.y[keep])
        actual.append(log_loss(fitted.X_test, fitted.y_test, coef, intercept) - base)
    actual_arr = np.asarray(actual)
    predicted = scores[rows]

    # First-order scores rank and sign refits well (they undershoot high-leverage rows).
    assert np.corrcoef(predicted, actual_arr)[0, 1] > 0.95
    assert np.all(np.sign(predicted[np.abs(actual_arr) > 1e-4]) ==
                  np.sign(actual_arr[np.abs(actual_arr) > 1e-4]))

    # And they are exactly (1/n) ∇T̂ᵀ C⁻¹ g_i, recomputed with dense numpy algebra.
    n = fitted.n
    X = np.hstack([fitted.X.astype(np.float64), np.ones((n, 1))])
    Xt = np.hstack([fitted.X_test.astype(np.float64), np.ones((len(fitted.y_test), 1))])
    theta = np.append(fitted.coef, fitted.intercept)
    p, pt = sigmoid(X @ theta), sigmoid(Xt @ theta)
    penalty = np.diag(np.append(np.full(X.shape[1] - 1, fitted.strength), 0.0))
    curvature = (X.T * (p * (1 - p))) @ X / n + penalty
    test_gradient = ((pt - fitted.y_test)[:, None] * Xt).mean(0)
    expected = ((p - fitted.y)[:, None] * X) @ np.linalg.solve(curvature, test_gradient) / n
    np.testing.assert_allclose(scores, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


def test_cv_matches_influence_steps_and_beats_in_sample_loss(
    alice: httpx.Client, fitted: Fitted, uploaded: Uploaded
) -> None:
    # Folds of 133-134 rows exceed AFIF_INLINE_MAX=100: their indices are artifacts.
    job = submit(alice, "cv", uploaded, folds=3, seed=3, solver="exact")
    result = result_of(alice, job["id"])
    SEEN[job["id"]] = result
    assert len(result["per_fold"]) == 3

    refit, in_sample, seen_rows = [], [], []
    for fold in result["per_fold"]:
        assert set(fold["indices"]) == {"artifact", "shape", "dtype"}
        held = fetch_array(alice, fold["indices"]).astype(np.int64)
        seen_rows.extend(held.tolist())
        X_held, y_held = fitted.X[held], fitted.y[held]

        # The plug-in loss at the one-step unlearned θ, recomputed with numpy.
        stepped = influence_step(fitted, held.tolist())
        assert fold["loss"] == pytest.approx(log_loss(X_held, y_held, *stepped), rel=1e-3)

        keep = np.setdiff1d(np.arange(fitted.n), held)
        refit.append(log_loss(X_held, y_held, *fit_logreg(fitted.X[keep], fitted.y[keep])))
        in_sample.append(log_loss(X_held, y_held, fitted.coef, fitted.intercept))
    assert sorted(seen_rows) == list(range(fitted.n)), "folds must partition the rows"

    # Against true K-fold refits, the estimate corrects part of the optimism of the
    # in-sample loss (one step from θ̂ undershoots a third of the data removed).
    estimate = result["estimate"]
    assert estimate == pytest.approx(np.mean([f["loss"] for f in result["per_fold"]]))
    assert np.mean(in_sample) < estimate < np.mean(refit)


def test_fairness_unlearning_lowers_parity_gap(
    alice: httpx.Client, fitted: Fitted, uploaded: Uploaded
) -> None:
    job = submit(alice, "fairness", uploaded, metric="demographic_parity", unlearn=True)
    result = result_of(alice, job["id"])
    SEEN[job["id"]] = result

    def gap(coef: np.ndarray, intercept: float) -> float:
        p = sigmoid(fitted.X.astype(np.float64) @ coef + intercept)
        s = fitted.sensitive == 1
        return float(abs(p[s].mean() - p[~s].mean()))

    assert result["metric_before"] == pytest.approx(gap(fitted.coef, fitted.intercept), rel=1e-3)
    assert result["n_removed"] > 0 and result["metric_after"] < result["metric_before"]
    assert "accuracy_before" in result and "accuracy_after" in result

    removed = sorted(int(i) for i in fetch_array(alice, result["removed"]))
    assert len(removed) == result["n_removed"]
    unlearned = download_weights(alice, result["model_id"])
    record = alice.get(f"/v1/models/{result['model_id']}").json()
    assert record["parent_id"] == uploaded.model["id"]
    assert record["removed_indices"] == removed

    # The new model is the one-step unlearning of those rows (dense numpy oracle), which
    # moves toward the exact refit without them.
    keep = np.setdiff1d(np.arange(fitted.n), removed)
    retrained = fit_logreg(fitted.X[keep], fitted.y[keep])
    baseline = distance((fitted.coef, fitted.intercept), retrained)
    assert distance(unlearned, influence_step(fitted, removed)) < 1e-4 * baseline
    assert distance(unlearned, retrained) < 0.6 * baseline
    assert gap(*unlearned) == pytest.approx(result["metric_after"], rel=0.05, abs=1e-4)


def test_idempotent_post_returns_the_same_job(alice: httpx.Client, uploaded: Uploaded) -> None:
    body = {
        "kind": "cv", "model_id": uploaded.model["id"], "dataset_id": uploaded.train["id"],
        "params": {"folds": 2, "solver": "exact"},
    }
    headers = {"Idempotency-Key": "retry-me-1"}
    first = alice.post("/v1/jobs", json=body, headers=headers)
    second = alice.post("/v1/jobs", json=body, headers=headers)
    assert first.status_code == 202, first.text
    assert second.status_code in (200, 202), second.text
    assert first.json()["id"] == second.json()["id"]

    other = dict(body, params={"folds": 3, "solver": "exact"})
    conflict = alice.post("/v1/jobs", json=other, headers=headers)
    assert conflict.status_code == 409
    wait_for(alice, first.json()["id"])


def test_labels_that_do_not_fit_the_family_are_refused(
    alice: httpx.Client, fitted: Fitted, uploaded: Uploaded
) -> None:
    from tests.integration.stack import upload_dataset

    bad = upload_dataset(alice, "bad-labels", X=fitted.X, y=fitted.y * 3)
    answer = alice.post("/v1/jobs", json={
        "kind": "cv", "model_id": uploaded.model["id"], "dataset_id": bad["id"], "params": {},
    })
    assert answer.status_code == 422
    problem = answer.json()
    assert problem["status"] == 422 and "bernoulli" in problem["detail"]


def test_cancel_a_running_job(alice: httpx.Client, uploaded: Uploaded) -> None:
    job = submit(alice, "unlearning", uploaded, **ENDLESS_PARAMS)
    wait_for(alice, job["id"], {"running"} | {"succeeded", "failed", "cancelled"})
    answer = alice.post(f"/v1/jobs/{job['id']}/cancel")
    assert answer.status_code in (200, 202), answer.text

    finished = wait_for(alice, job["id"], timeout=120)
    assert finished["status"] == "cancelled", finished
    assert alice.get(f"/v1/jobs/{job['id']}/result").status_code == 409
    assert alice.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409


@pytest.fixture
def seen(alice: httpx.Client, uploaded: Uploaded) -> dict[str, dict[str, Any]]:
    """Results of the jobs run so far in this module (one cv job when run alone)."""
    if not SEEN:
        job = submit(alice, "cv", uploaded, folds=2, solver="exact")
        SEEN[job["id"]] = result_of(alice, job["id"])
    return SEEN


def test_pagination_and_filters(alice: httpx.Client, uploaded: Uploaded,
                                seen: dict[str, Any]) -> None:
    extra = [submit(alice, "cv", uploaded, folds=2, solver="exact")["id"] for _ in range(3)]
    every: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = alice.get("/v1/jobs", params=params).json()
        assert len(page["items"]) <= 2
        every += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(every) == len(set(every)) >= len(seen) + 3
    assert set(seen) | set(extra) <= set(every)

    cv_jobs = alice.get("/v1/jobs", params={"kind": "cv", "limit": 100}).json()["items"]
    assert cv_jobs and all(item["kind"] == "cv" for item in cv_jobs)
    done = alice.get("/v1/jobs", params={"status": "succeeded", "limit": 100}).json()["items"]
    assert set(seen) <= {item["id"] for item in done}
    assert alice.get("/v1/jobs", params={"status": "bogus"}).status_code == 422


def test_tenants_see_only_their_own(alice: httpx.Client, bob: httpx.Client,
                                    uploaded: Uploaded, seen: dict[str, Any]) -> None:
    job_id = next(iter(seen))
    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/result",
                 f"/v1/models/{uploaded.model['id']}", f"/v1/datasets/{uploaded.train['id']}",
                 f"/v1/models/{uploaded.model['id']}/weights"):
        assert bob.get(path).status_code == 404, path
        assert alice.get(path).status_code == 200, path
    assert bob.get("/v1/jobs").json()["items"] == []
    stolen = bob.post("/v1/jobs", json={
        "kind": "cv", "model_id": uploaded.model["id"], "dataset_id": uploaded.train["id"],
        "params": {},
    })
    assert stolen.status_code == 404
    assert httpx.get(f"{alice.base_url}/v1/jobs").status_code == 401


def test_up_restarts_a_worker_that_died(stack: Stack, alice: httpx.Client,
                                        uploaded: Uploaded) -> None:
    import psutil

    def workers() -> set[int]:
        """Live worker children of `afif up` (a killed one may linger as a zombie)."""
        assert stack.process is not None
        alive = set()
        for child in psutil.Process(stack.process.pid).children():
            try:
                if child.status() != psutil.STATUS_ZOMBIE and "worker" in child.cmdline():
                    alive.add(child.pid)
            except psutil.Error:
                continue
        return alive

    before = workers()
    assert len(before) == 2
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while len(workers() - {victim}) < 2:
        assert time.monotonic() < deadline, f"no replacement worker:\n{stack.log()}"
        time.sleep(0.2)
    job = submit(alice, "cv", uploaded, folds=2, solver="exact")
    assert len(result_of(alice, job["id"])["per_fold"]) == 2


def test_restarted_stack_still_serves_every_result(
    stack: Stack, alice: httpx.Client, seen: dict[str, Any]
) -> None:
    stack.restart()
    with stack.client(alice.headers["Authorization"].split()[-1]) as again:
        for job_id, result in seen.items():
            answer = again.get(f"/v1/jobs/{job_id}/result")
            assert answer.status_code == 200, answer.text
            assert answer.json() == result
        for model_id in [r["model_id"] for r in seen.values() if "model_id" in r]:
            weights = again.get(f"/v1/models/{model_id}/weights")
            assert weights.status_code == 200
            from safetensors.numpy import load

            assert set(load(weights.content)) == {"0.weight", "0.bias"}
