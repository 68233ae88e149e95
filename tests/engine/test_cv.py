"""Approximate cross-validation against exactly retrained cross-validation."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer
from sklearn.preprocessing import StandardScaler

from engine.errors import SpecError
from engine.tasks import cross_validate
from tests.engine import oracles
from tests.engine.task_problems import linear_problem

LAM = 1e-2


@pytest.fixture(scope="module")
def cancer():
    X, y = load_breast_cancer(return_X_y=True)
    X, y = StandardScaler().fit_transform(X), y.astype(float)
    return X, y, oracles.fit_logistic(X, y, LAM, penalize_bias=False)


def _folds_of(result) -> list[np.ndarray]:
    starts = list(result.arrays["fold_starts"]) + [len(result.arrays["folds"])]
    return [result.arrays["folds"][a:b] for a, b in zip(starts, starts[1:], strict=False)]


@pytest.mark.parametrize(("k", "folds"), [(None, 5), (100, 5), (1, None)])
def test_approximate_cv_within_five_percent_of_retrained_cv(cancer, k, folds):
    X, y, theta_hat = cancer
    problem = linear_problem(X, y, theta_hat, "bernoulli", "l2", LAM)

    result = cross_validate(problem, k=k, folds=folds, seed=3)

    parts = _folds_of(result)
    exact = oracles.exact_logistic_cv(X, y, LAM, parts, penalize_bias=False)
    estimate = result.values["estimate"]
    print(f"\nk={k} folds={folds}: approximate {estimate:.5f}, retrained {exact:.5f}, "
          f"in-sample {result.values['in_sample_loss']:.5f}")
    assert abs(estimate - exact) <= 0.05 * exact
    # Held-out loss exceeds the in-sample loss of the same rows (optimism of the fit).
    assert result.values["in_sample_loss"] < estimate
    assert len(parts) == result.values["n_folds"]
    assert np.unique(result.arrays["folds"]).size == len(result.arrays["folds"])


def test_l1_cv_uses_the_proximal_step_and_matches_retraining(cancer):
    X, y, _ = cancer
    theta_hat = oracles.fit_logistic_l1(X, y, LAM)
    problem = linear_problem(X, y, theta_hat, "bernoulli", "l1", LAM)

    result = cross_validate(problem, folds=5, seed=1)

    losses = []
    for fold in _folds_of(result):
        weights = np.ones(len(y))
        weights[fold] = 0.0
        theta = oracles.fit_logistic_l1(X, y, LAM, weights, theta0=theta_hat)
        losses.append(oracles.logistic_loss_mean(X[fold], y[fold], theta))
    assert abs(result.values["estimate"] - np.mean(losses)) <= 0.05 * np.mean(losses)


@pytest.mark.parametrize(
    ("k", "folds", "message"),
    [
        (None, 1, "folds must be"),
        (0, None, "k must be"),
        (569, None, "k must be"),
        (200, 3, "do not fit"),
        (2.5, None, "k must be"),
    ],
)
def test_bad_fold_requests_raise_typed_errors(cancer, k, folds, message):
    X, y, theta_hat = cancer
    problem = linear_problem(X, y, theta_hat, "bernoulli", "l2", LAM)
    with pytest.raises(SpecError, match=message):
        cross_validate(problem, k=k, folds=folds)
