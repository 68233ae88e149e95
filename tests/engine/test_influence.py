"""The general influence task against dense numpy algebra (L2 logistic regression)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_diabetes
from sklearn.preprocessing import StandardScaler

from engine.errors import SpecError
from engine.tasks import fairness, influence
from tests.engine import oracles
from tests.engine.task_problems import cancer_logistic_split, linear_problem

LAM = 1e-2


@pytest.fixture(scope="module")
def cancer_split():
    """breast_cancer: 400 training rows at the L2 logistic optimum, 169 held-out rows."""
    return cancer_logistic_split(400, LAM)


def _dense_scores(X, y, theta, grad_T) -> np.ndarray:
    """(1/n) g_iᵀ H⁻¹ ∇T for every row, from the dense numpy Hessian."""
    _, grads, _ = oracles.logistic_per_sample(X, y, theta)
    _, _, hess = oracles.logistic_objective(X, y, theta, LAM, penalize_bias=False)
    return grads @ np.linalg.solve(hess, grad_T) / len(y)


@pytest.mark.parametrize(("method", "solver"), [("fisher", "cg"), ("hessian", "exact")])
def test_callable_objective_matches_dense_algebra(cancer_split, method, solver):
    X, y, X_test, _, theta = cancer_split
    problem = linear_problem(X, y, theta, "bernoulli", "l2", LAM)
    inputs = problem.as_inputs(X_test)

    def mean_probability_plus_norm(params):
        # A non-loss objective with a parameter-space term: mean P(y=1) on the held-out
        # rows plus ½‖w‖² of the weights.
        p = torch.sigmoid(problem.forward(params, inputs)[:, 0])
        return p.mean() + 0.5 * (params["0.weight"] ** 2).sum()

    result = influence(problem, mean_probability_plus_norm, method=method, solver=solver,
                       solver_options={"tol": 1e-12} if solver == "cg" else None)

    A = np.hstack([X_test, np.ones((len(X_test), 1))])
    p = 1 / (1 + np.exp(-A @ theta))
    grad_T = A.T @ (p * (1 - p)) / len(p) + np.r_[theta[:-1], 0.0]
    expected = _dense_scores(X, y, theta, grad_T)
    got = result.arrays["scores"]
    assert got.shape == (len(y),)
    assert np.abs(got - expected).max() <= 1e-8 * np.abs(expected).max()
    assert result.values["objective_value"] == pytest.approx(
        p.mean() + 0.5 * np.sum(theta[:-1] ** 2), rel=1e-12)
    assert result.values["convention"] == "removal"
    assert result.values["converged"] is True


def test_named_mean_loss_matches_dense_algebra(cancer_split):
    X, y, X_test, y_test, theta = cancer_split
    problem = linear_problem(X, y, theta, "bernoulli", "l2", LAM)

    result = influence(problem, {"name": "mean_loss", "X": X_test, "y": y_test})

    _, test_grads, _ = oracles.logistic_per_sample(X_test, y_test, theta)
    expected = _dense_scores(X, y, theta, test_grads.mean(axis=0))
    assert np.abs(result.arrays["scores"] - expected).max() <= 1e-8 * np.abs(expected).max()


def test_named_demographic_parity_matches_dense_algebra_and_fairness_scores():
    X, y = load_diabetes(return_X_y=True)
    s = (X[:, 1] > 0).astype(float)
    X = StandardScaler().fit_transform(np.delete(X, 1, axis=1))
    y = (y > np.median(y)).astype(float)
    theta = oracles.fit_logistic(X, y, LAM, penalize_bias=False)
    problem = linear_problem(X, y, theta, "bernoulli", "l2", LAM)

    result = influence(problem, {"name": "demographic_parity", "sensitive": s})

    A = np.hstack([X, np.ones((len(y), 1))])
    p = 1 / (1 + np.exp(-A @ theta))
    gap = p[s == 1].mean() - p[s == 0].mean()
    weights = np.where(s == 1, 1 / (s == 1).sum(), -1 / (s == 0).sum())
    grad_T = np.sign(gap) * A.T @ (p * (1 - p) * weights)
    expected = _dense_scores(X, y, theta, grad_T)
    assert result.values["objective_value"] == pytest.approx(abs(gap), rel=1e-12)
    assert np.abs(result.arrays["scores"] - expected).max() <= 1e-8 * np.abs(expected).max()
    # The fairness task shares this code path: same scores.
    shared = fairness(problem, s, unlearn=False).arrays["scores"]
    assert np.abs(shared - expected).max() <= 1e-8 * np.abs(expected).max()


@pytest.mark.parametrize(("objective", "message"), [
    ("test_loss", "objective name must be one of"),
    ({"name": "mean_loss", "X": np.zeros((3, 30))}, "needs X and y"),
    ({"name": "chi2"}, "needs sensitive"),
    ({"name": "train_loss", "alpha": 1}, "does not take alpha"),
    (lambda params: params["0.weight"], "scalar tensor"),
    (lambda params: torch.tensor(1.0, dtype=torch.float64), "does not depend"),
    (3.0, "objective must be"),
])
def test_bad_objectives_are_refused(cancer_split, objective, message):
    X, y, _, _, theta = cancer_split
    problem = linear_problem(X, y, theta, "bernoulli", "l2", LAM)
    with pytest.raises(SpecError, match=message):
        influence(problem, objective)


def test_progress_reports_each_phase_to_completion(cancer_split):
    X, y, _, _, theta = cancer_split
    problem = linear_problem(X, y, theta, "bernoulli", "l2", LAM)
    calls: list[tuple[str, int, int]] = []

    influence(problem, "train_loss", solver="cg", progress=lambda *c: calls.append(c))

    phases = [c[0] for c in calls]
    assert phases[0] == "gradient" and {"gradient", "solve", "scoring"} <= set(phases)
    for phase in ("gradient", "solve", "scoring"):
        last = [c for c in calls if c[0] == phase][-1]
        assert last[1] == last[2] > 0
