"""Attribution: scores against dense numpy algebra, leave-one-out retraining and the
proximal Bregman response (Fisher), on logistic regression and a tiny tanh MLP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from engine.errors import SpecError
from engine.tasks import attribute
from tests.engine import oracles
from tests.engine.task_problems import cancer_logistic_split, linear_problem, mlp_problem

LAM = 1e-2


@pytest.fixture(scope="module")
def cancer_split():
    return cancer_logistic_split(420, LAM)


@pytest.fixture(scope="module")
def digits_mlp():
    """Odd vs even digits on 10 principal components, 300 training rows, 10→8→1 tanh,
    λ = 3e-2, trained to a vanishing gradient by the oracle."""
    X, y = load_digits(return_X_y=True)
    centered = X - X.mean(axis=0)
    components = np.linalg.svd(centered, full_matrices=False)[2][:10]
    Z = centered @ components.T
    Z /= Z.std(axis=0)
    labels = (y % 2).astype(float)
    order = np.random.default_rng(0).permutation(len(labels))
    train, test = order[:300], order[300:500]
    oracle = oracles.TinyMLP(Z[train], labels[train], hidden=8, lam=3e-2)
    theta = oracle.fit(seed=0)
    return oracle, theta, Z[test], labels[test]


def test_logistic_scores_equal_dense_algebra_and_rank_like_leave_one_out(cancer_split):
    X, y, X_test, y_test, theta_hat = cancer_split
    n = len(y)
    problem = linear_problem(X, y, theta_hat, "bernoulli", "l2", LAM)

    result = attribute(problem, X_test, y_test, top_k=5)

    # Dense oracle: scores[i, j] = (1/n) ∇ℓ_test_jᵀ H⁻¹ g_i.
    _, grads, _ = oracles.logistic_per_sample(X, y, theta_hat)
    _, test_grads, _ = oracles.logistic_per_sample(X_test, y_test, theta_hat)
    _, _, hess = oracles.logistic_objective(X, y, theta_hat, LAM, penalize_bias=False)
    expected = grads @ np.linalg.solve(hess, test_grads.T) / n
    scores = result.arrays["scores"]
    assert scores.shape == (n, len(y_test))
    assert np.abs(scores - expected).max() <= 1e-6 * np.abs(expected).max()
    assert np.array_equal(result.arrays["helpful"][:, 0], expected.argmax(axis=0))
    assert np.array_equal(result.arrays["harmful"][:, 0], expected.argmin(axis=0))
    assert result.values["convention"] == "removal"

    # Actual leave-one-out retraining of the mean test loss, 60 rows.
    base = oracles.logistic_loss_mean(X_test, y_test, theta_hat)
    rows = np.random.default_rng(1).choice(n, 60, replace=False)
    actual = []
    for row in rows:
        weights = np.ones(n)
        weights[row] = 0.0
        theta = oracles.fit_logistic(X, y, LAM, weights, penalize_bias=False, theta0=theta_hat)
        actual.append(oracles.logistic_loss_mean(X_test, y_test, theta) - base)
    predicted = result.arrays["mean_scores"][rows]
    assert oracles.spearman(predicted, np.array(actual)) >= 0.95
    # Removal convention: the sign of the predicted change is the sign of the actual one.
    big = np.abs(actual) > np.median(np.abs(actual))
    assert np.all(np.sign(predicted[big]) == np.sign(np.array(actual)[big]))


def test_mlp_hessian_tracks_retraining_and_fisher_tracks_the_bregman_response(digits_mlp):
    oracle, theta_hat, X_test, y_test = digits_mlp
    problem = mlp_problem(oracle, theta_hat)
    rows = np.random.default_rng(2).choice(oracle.n, 50, replace=False)
    base = oracle.mean_loss(theta_hat, X_test, y_test)

    ones = torch.ones(oracle.n, dtype=torch.float64)
    hess = oracle.hessian(lambda t: oracle.objective(t, ones), theta_hat)
    retrained = np.array([oracle.mean_loss(oracle.retrain_without(theta_hat, [i], hess),
                                           X_test, y_test) - base for i in rows])
    bregman_hess = oracle.hessian(oracle.pbrf_objective(theta_hat, None, 0.0), theta_hat)
    bregman = np.array([oracle.mean_loss(oracle.pbrf(theta_hat, int(i), 0.0, bregman_hess),
                                         X_test, y_test) - base for i in rows])

    hessian_scores = attribute(problem, X_test, y_test, method="hessian").arrays["mean_scores"]
    fisher_scores = attribute(problem, X_test, y_test, method="fisher").arrays["mean_scores"]

    rho_h = oracles.spearman(hessian_scores[rows], retrained)
    rho_f = oracles.spearman(fisher_scores[rows], bregman)
    print(f"\nMLP Spearman: hessian vs retraining {rho_h:.3f}, fisher vs PBRF {rho_f:.3f}, "
          f"fisher vs retraining {oracles.spearman(fisher_scores[rows], retrained):.3f}")
    assert rho_h >= 0.95
    assert rho_f >= 0.85


def test_progress_is_reported_per_phase_and_errors_from_it_propagate(cancer_split):
    X, y, X_test, y_test, theta_hat = cancer_split
    problem = linear_problem(X, y, theta_hat, "bernoulli", "l2", LAM)
    calls = []

    attribute(problem, X_test[:5], y_test[:5], progress=lambda *a: calls.append(a))

    phases = [c[0] for c in calls]
    assert {"gradient", "solve", "scoring"} <= set(phases)
    assert all(done <= total for _, done, total in calls)
    assert calls[-1][1] == calls[-1][2]

    class Cancelled(Exception):
        pass

    def cancel(phase, done, total):
        raise Cancelled(phase)

    with pytest.raises(Cancelled):
        attribute(problem, X_test[:5], y_test[:5], progress=cancel)


@pytest.mark.parametrize(
    ("X_rows", "y_rows", "top_k", "message"),
    [
        (slice(0, 5), slice(0, 4), 3, "rows"),
        (slice(0, 5), slice(0, 5), 0, "top_k"),
    ],
)
def test_bad_inputs_raise_typed_errors(cancer_split, X_rows, y_rows, top_k, message):
    X, y, X_test, y_test, theta_hat = cancer_split
    problem = linear_problem(X, y, theta_hat, "bernoulli", "l2", LAM)
    with pytest.raises(SpecError, match=message):
        attribute(problem, X_test[X_rows], y_test[y_rows], top_k=top_k)


def test_wrong_feature_count_and_labels_are_refused(cancer_split):
    X, y, X_test, y_test, theta_hat = cancer_split
    problem = linear_problem(X, y, theta_hat, "bernoulli", "l2", LAM)
    with pytest.raises(SpecError, match="row shape"):
        attribute(problem, X_test[:, :5], y_test)
    with pytest.raises(SpecError, match="0/1"):
        attribute(problem, X_test, y_test + 2)
