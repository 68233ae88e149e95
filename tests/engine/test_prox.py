"""Fisher-metric prox: soft-thresholding when F = I, scipy and KKT checks on a dense F."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from engine.operators import DenseOperator, fisher_operator, mean_gradient
from engine.problem import Problem
from engine.prox import fisher_prox
from engine.regularizers import make_regularizer
from engine.solvers import solve
from engine.training import fit


def _problem(cancer: tuple, make_linear, kind: str, lam: float) -> Problem:  # noqa: ANN001
    X, y = cancer
    reg = make_regularizer(kind, lam, exclude=["0.bias"], l1_ratio=0.5)
    return Problem(make_linear(30, 1), "bernoulli", reg, X, y, batch_size=600)


def test_identity_metric_gives_soft_thresholding(cancer: tuple, make_linear) -> None:  # noqa: ANN001
    problem = _problem(cancer, make_linear, "l1", 0.3)
    v = torch.randn(problem.d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    x, report = fisher_prox(problem, v, op=DenseOperator(torch.eye(problem.d).double()),
                            lipschitz=1.0)
    expected = np.sign(v.numpy()) * np.maximum(np.abs(v.numpy()) - 0.3, 0.0)
    expected[-1] = v[-1]  # the bias is excluded from the penalty
    np.testing.assert_allclose(x.numpy(), expected, atol=1e-12)
    assert report.converged and report.iterations == 2  # one step, then a zero step


def _scipy_l1_prox(F: np.ndarray, v: np.ndarray, l1: np.ndarray, l2: np.ndarray) -> np.ndarray:
    """argmin ½(x−v)ᵀF(x−v) + Σ l1_j|x_j| + ½ Σ l2_j x_j² with x = a − b, a, b ≥ 0."""
    d = v.size

    def obj(z: np.ndarray) -> tuple[float, np.ndarray]:
        x = z[:d] - z[d:]
        r = x - v
        g = F @ r + l2 * x
        val = 0.5 * r @ F @ r + l1 @ z[:d] + l1 @ z[d:] + 0.5 * l2 @ (x * x)
        return float(val), np.concatenate([g + l1, -g + l1])

    z0 = np.concatenate([np.maximum(v, 0), np.maximum(-v, 0)])
    res = minimize(obj, z0, jac=True, method="L-BFGS-B", bounds=[(0, None)] * (2 * d),
                   options={"ftol": 1e-16, "gtol": 1e-13, "maxiter": 50_000, "maxcor": 50})
    return res.x[:d] - res.x[d:]


@pytest.mark.parametrize("kind", ["l1", "elastic_net"])
def test_dense_fisher_prox_matches_scipy(cancer: tuple, make_linear, kind: str) -> None:  # noqa: ANN001
    problem = _problem(cancer, make_linear, kind, 0.02)
    op = fisher_operator(problem, regularized=False)
    F = op.dense().numpy()
    v = problem.theta() * 3.0

    x, report = fisher_prox(problem, v, op=DenseOperator(torch.tensor(F)), tol=1e-12,
                            max_iter=20_000)
    mask = np.r_[np.ones(30), 0.0]
    a = 1.0 if kind == "l1" else 0.5
    ref = _scipy_l1_prox(F, v.numpy(), 0.02 * a * mask, 0.02 * (1 - a) * mask)
    np.testing.assert_allclose(x.numpy(), ref, atol=2e-6)
    assert report.converged and (x.numpy()[:30] == 0).sum() > 0  # sparsity appears


def test_group_lasso_prox_satisfies_kkt(cancer: tuple, make_linear) -> None:  # noqa: ANN001
    X, y = cancer
    reg = make_regularizer("group_lasso", 0.05, groups=[["0.weight"], ["0.bias"]])
    problem = Problem(make_linear(30, 1), "bernoulli", reg, X, y)
    op = fisher_operator(problem, regularized=False)
    F = op.dense().numpy()
    v = torch.cat([problem.theta()[:30] * 0.05, torch.tensor([2.0], dtype=torch.float64)])

    x, _ = fisher_prox(problem, v, op=op, tol=1e-13, max_iter=20_000)
    g = F @ (x.numpy() - v.numpy())
    w, b = x.numpy()[:30], x.numpy()[30]
    if np.linalg.norm(w) == 0:
        assert np.linalg.norm(g[:30]) <= 0.05 + 1e-8
    else:
        np.testing.assert_allclose(g[:30], -0.05 * w / np.linalg.norm(w), atol=1e-7)
    assert b != 0
    assert g[30] == pytest.approx(-0.05 * np.sign(b), abs=1e-7)


def test_trained_optimum_is_a_fixed_point(cancer: tuple, make_linear) -> None:  # noqa: ANN001
    problem = _problem(cancer, make_linear, "l1", 0.01)
    problem.load_state_dict(fit(problem, tol=1e-10)[0])
    op = fisher_operator(problem, regularized=False, damping=1e-8)

    # v = θ̂ − F⁻¹ b_w with w = 1, where b_w is the full data gradient.
    step, _ = solve(op, mean_gradient(problem), "exact")
    x, _ = fisher_prox(problem, problem.theta() - step, op=op, x0=problem.theta(), tol=1e-13,
                       max_iter=20_000)
    np.testing.assert_allclose(x.numpy(), problem.theta().numpy(), atol=1e-6)
