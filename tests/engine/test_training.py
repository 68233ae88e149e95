"""Training against scikit-learn and scipy optima, with the 1/n-weighted objective."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from sklearn.linear_model import LogisticRegression, PoissonRegressor

from engine.errors import SpecError
from engine.problem import Problem
from engine.regularizers import make_regularizer
from engine.training import fit


def _coef(state: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    return state["0.weight"].numpy(), state["0.bias"].numpy()


def test_logistic_matches_sklearn_and_is_tight(cancer: tuple, make_linear) -> None:  # noqa: ANN001
    X, y = cancer
    n, lam = len(y), 1e-2
    problem = Problem(make_linear(30, 1), "bernoulli",
                      make_regularizer("l2", lam, exclude=["0.bias"]), X, y)
    before = problem.theta().clone()

    state, report = fit(problem)
    ref = LogisticRegression(C=1 / (n * lam), tol=1e-12, max_iter=10_000).fit(X, y)
    w, b = _coef(state)
    np.testing.assert_allclose(w.ravel(), ref.coef_.ravel(), atol=1e-5)
    np.testing.assert_allclose(b, ref.intercept_, atol=1e-5)
    assert report.converged and report.gradient_norm < 1e-7
    torch.testing.assert_close(problem.theta(), before)  # the problem is left as it was


def test_weighted_removal_keeps_one_over_n(cancer: tuple, make_linear) -> None:  # noqa: ANN001
    X, y = cancer
    n, lam = len(y), 1e-2
    weights = np.ones(n)
    weights[:40] = 0.0  # remove 40 rows; the objective still divides by n
    problem = Problem(make_linear(30, 1, dtype=torch.float32), "bernoulli",
                      make_regularizer("l2", lam, exclude=["0.bias"]), X, y)

    state, report = fit(problem, weights=weights)
    ref = LogisticRegression(C=1 / (n * lam), tol=1e-12, max_iter=10_000).fit(
        X, y, sample_weight=weights)
    assert state["0.weight"].dtype == torch.float32 and report.dtype == "float64"
    np.testing.assert_allclose(state["0.weight"].numpy().ravel(), ref.coef_.ravel(),
                               atol=1e-5)


def test_multinomial_matches_sklearn(wine: tuple, make_linear) -> None:  # noqa: ANN001
    X, y = wine
    n, lam = len(y), 1e-2
    problem = Problem(make_linear(13, 3), "categorical",
                      make_regularizer("l2", lam, exclude=["0.bias"]), X, y)
    state, _ = fit(problem)
    ref = LogisticRegression(C=1 / (n * lam), tol=1e-12, max_iter=10_000).fit(X, y)
    w, b = _coef(state)
    np.testing.assert_allclose(w, ref.coef_, atol=1e-5)
    # Intercepts are identified only up to a common shift (they are not penalized).
    np.testing.assert_allclose(b - b.mean(), ref.intercept_ - ref.intercept_.mean(), atol=1e-5)


def test_poisson_and_gaussian_match_references(diabetes: tuple, make_linear) -> None:  # noqa: ANN001
    X, y = diabetes
    n, lam = len(y), 1e-2
    counts = np.floor(np.exp(0.5 * y) * 2)
    poisson = Problem(make_linear(10, 1), "poisson",
                      make_regularizer("l2", lam, exclude=["0.bias"]), X, counts)
    state, _ = fit(poisson)
    # PoissonRegressor: (1/2n) Σ deviance + (α/2)‖w‖², the same optimum with α = λ.
    ref = PoissonRegressor(alpha=lam, tol=1e-12, max_iter=10_000).fit(X, counts)
    np.testing.assert_allclose(state["0.weight"].numpy().ravel(), ref.coef_, atol=1e-5)

    gaussian = Problem(make_linear(10, 1), "gaussian", make_regularizer("l2", lam), X, y)
    state, _ = fit(gaussian)
    # (1/n) Σ ½ r² + λ ½ ‖θ‖² (bias penalized too): normal equations in numpy.
    A = np.hstack([X, np.ones((n, 1))])
    theta = np.linalg.solve(A.T @ A / n + lam * np.eye(11), A.T @ y / n)
    np.testing.assert_allclose(np.r_[state["0.weight"].numpy().ravel(),
                                     state["0.bias"].numpy()], theta, atol=1e-7)


def test_l1_logistic_matches_scipy(cancer: tuple, make_linear) -> None:  # noqa: ANN001
    X, y = cancer
    n, lam = len(y), 2e-2
    problem = Problem(make_linear(30, 1), "bernoulli",
                      make_regularizer("l1", lam, exclude=["0.bias"]), X, y)
    state, report = fit(problem, tol=1e-10)
    assert report.method == "fista" and report.converged

    # Oracle: w = a − c with a, c ≥ 0 makes the l1 problem smooth; L-BFGS-B, tight.
    A = np.hstack([X, np.ones((n, 1))])

    def obj(z: np.ndarray) -> tuple[float, np.ndarray]:
        theta = np.r_[z[:30] - z[30:60], z[60]]
        f = A @ theta
        loss = np.mean(np.logaddexp(0.0, f) - y * f) + lam * z[:60].sum()
        g = A.T @ (0.5 * (1 + np.tanh(0.5 * f)) - y) / n
        return float(loss), np.r_[g[:30] + lam, -g[:30] + lam, g[30]]

    res = minimize(obj, np.zeros(61), jac=True, method="L-BFGS-B",
                   bounds=[(0, None)] * 60 + [(None, None)],
                   options={"ftol": 1e-16, "gtol": 1e-12, "maxiter": 50_000})
    w_ref = res.x[:30] - res.x[30:60]
    np.testing.assert_allclose(state["0.weight"].numpy().ravel(), w_ref, atol=1e-5)
    assert (state["0.weight"] == 0).sum() >= (np.abs(w_ref) < 1e-8).sum() - 1


def test_mlp_adam_then_lbfgs_reaches_a_stationary_point(iris: tuple, make_mlp) -> None:  # noqa: ANN001
    X, y = iris
    problem = Problem(make_mlp(4, 6, 3, activation="tanh", dtype=torch.float32),
                      "categorical", make_regularizer("l2", 1e-3), X, y, batch_size=64)
    state, report = fit(problem, adam_steps=100, adam_lr=1e-2, max_iter=300)

    # Independent check: gradient of the objective written out by hand in float64.
    t = {k: v.double().requires_grad_(True) for k, v in state.items()}
    Xt = torch.tensor(X)
    logits = torch.tanh(Xt @ t["0.weight"].T + t["0.bias"]) @ t["2.weight"].T + t["2.bias"]
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(y)) + 1e-3 * 0.5 * sum(
        (p * p).sum() for p in t.values())
    grads = torch.autograd.grad(loss, list(t.values()))
    assert float(torch.sqrt(sum((g * g).sum() for g in grads))) < 1e-5
    assert report.objective == pytest.approx(loss.detach().item(), rel=1e-5)


def test_bad_weights_are_rejected(cancer: tuple, make_linear) -> None:  # noqa: ANN001
    X, y = cancer
    problem = Problem(make_linear(30, 1), "bernoulli", None, X, y)
    with pytest.raises(SpecError, match="weights must have shape"):
        fit(problem, weights=np.ones(3))
    with pytest.raises(SpecError, match="finite and >= 0"):
        fit(problem, weights=-np.ones(len(y)))
