"""Solvers against numpy's dense solve; divergence is detected and raised."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from engine.errors import SolverDiverged, SpecError
from engine.operators import DenseOperator, fisher_operator, hessian_operator
from engine.problem import Problem
from engine.regularizers import make_regularizer
from engine.solvers import solve


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


@pytest.fixture()
def conditioned(cancer: tuple, make_linear) -> tuple[Problem, np.ndarray]:  # noqa: ANN001
    """Logistic regression with λ = 0.1 and its dense F + λI from numpy."""
    X, y = cancer
    problem = Problem(make_linear(30, 1), "bernoulli", make_regularizer("l2", 0.1), X, y,
                      batch_size=256)
    A = np.hstack([X, np.ones((len(X), 1))])
    p = _sigmoid(A @ problem.theta().numpy())
    C = A.T @ (A * (p * (1 - p))[:, None]) / len(X) + 0.1 * np.eye(31)
    return problem, C


def _rel(x: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.linalg.norm(x.numpy() - ref) / np.linalg.norm(ref))


def test_exact_cg_lissa_agree_with_numpy(conditioned: tuple) -> None:
    problem, C = conditioned
    op = fisher_operator(problem)
    b = torch.randn(problem.d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = np.linalg.solve(C, b.numpy())

    x_exact, r_exact = solve(op, b, "exact")
    x_cg, r_cg = solve(op, b, "cg", tol=1e-8)
    # A batch of every row makes the Neumann series deterministic.
    x_lissa, r_lissa = solve(op, b, "lissa", depth=400, batch_size=problem.n, tol=1e-4)

    assert _rel(x_exact, ref) < 1e-10 and r_exact.converged
    assert _rel(x_cg, ref) < 1e-6 and r_cg.converged and r_cg.iterations < 60
    assert _rel(x_lissa, ref) < 1e-3 and r_lissa.converged
    lam_max = np.linalg.eigvalsh(C).max()
    assert r_lissa.scale == pytest.approx(1.05 * lam_max, rel=1e-2)
    for report in (r_exact, r_cg, r_lissa):
        assert report.relative_residual < 1e-3 and not report.diverged
        json.dumps(report.to_dict())


def test_stochastic_lissa_and_many_right_hand_sides(conditioned: tuple) -> None:
    problem, C = conditioned
    op = fisher_operator(problem)
    B = torch.randn(problem.d, 3, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    ref = np.linalg.solve(C, B.numpy())

    X_cg, r_cg = solve(op, B, "cg", tol=1e-8)
    X_ex, _ = solve(op, B, "auto")
    X_li, r_li = solve(op, B, "lissa", depth=200, repeats=3, batch_size=128, seed=3)
    assert X_cg.shape == (problem.d, 3)
    assert _rel(X_cg, ref) < 1e-6 and _rel(X_ex, ref) < 1e-10
    assert _rel(X_li, ref) < 0.05  # minibatch noise; averaged over 3 repetitions
    assert r_li.iterations == 600 and r_cg.products >= 3 * r_cg.iterations // 3


def test_lissa_on_indefinite_hessian_is_reported_diverged(tanh_mlp: Problem) -> None:
    # A tanh MLP at a random θ: the Hessian has negative eigenvalues (see test_operators).
    b = torch.randn(tanh_mlp.d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(SolverDiverged) as info:
        solve(hessian_operator(tanh_mlp), b, "lissa", depth=300, batch_size=64)
    report = info.value.report
    assert report.diverged and not report.converged and report.solver == "lissa"
    assert "indefinite" in report.message

    # The Fisher at the same θ is PSD and the same solve goes through.
    x, ok = solve(fisher_operator(tanh_mlp, damping=0.1), b, "lissa", depth=100,
                  batch_size=tanh_mlp.n)
    assert not ok.diverged and ok.relative_residual < 1.0


def _indefinite() -> tuple[DenseOperator, np.ndarray]:
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    M = Q @ np.diag([-0.5, 0.3, 1.0, 1.5, 2.0, 3.0]) @ Q.T
    return DenseOperator(torch.tensor(M)), M


def test_constructed_indefinite_operator() -> None:
    op, M = _indefinite()
    b = torch.ones(6, dtype=torch.float64)

    with pytest.raises(SolverDiverged) as lissa:
        solve(op, b, "lissa", depth=200)
    assert lissa.value.report.diverged
    with pytest.raises(SolverDiverged) as cg:
        solve(op, b, "cg")
    assert cg.value.report.details["negative_curvature"] is True

    x, report = solve(op, b, "exact")  # well-defined: M is invertible
    np.testing.assert_allclose(x.numpy(), np.linalg.solve(M, b.numpy()), rtol=1e-10)
    assert report.details["method"] == "eigh"
    assert report.details["min_eigenvalue"] == pytest.approx(-0.5)
    assert report.details["negative_eigenvalues"] == 1


def test_hand_picked_scale_too_small_diverges() -> None:
    M = np.diag([0.1, 1.0, 4.0])
    with pytest.raises(SolverDiverged, match="scale"):
        solve(DenseOperator(torch.tensor(M)), torch.ones(3, dtype=torch.float64), "lissa",
              scale=1.0, depth=100)


def test_cg_not_converged_is_reported_not_raised() -> None:
    M = np.diag(np.logspace(-4, 0, 50))
    x, report = solve(DenseOperator(torch.tensor(M)), torch.ones(50, dtype=torch.float64),
                      "cg", max_iter=5)
    assert not report.converged and not report.diverged and report.iterations == 5
    assert "not converged" in report.message


@pytest.mark.parametrize(("solver", "rhs", "options", "fragment"), [
    ("newton", torch.ones(3), {}, "unknown solver"),
    ("cg", torch.ones(3), {"depth": 3}, "unknown option 'depth' for solver 'cg'"),
    ("cg", torch.ones(4), {}, "right-hand side has shape [4]"),
    ("exact", torch.tensor([1.0, float("nan"), 0.0]), {}, "NaN or inf"),
    ("lissa", torch.ones(3), {"scale": -1.0}, "scale must be > 0"),
])
def test_bad_solver_arguments(solver: str, rhs: torch.Tensor, options: dict,
                              fragment: str) -> None:
    op = DenseOperator(torch.eye(3, dtype=torch.float64))
    with pytest.raises(SpecError) as info:
        solve(op, rhs, solver, **options)
    assert fragment in str(info.value)


class _Cancelled(Exception):
    pass


@pytest.mark.parametrize("solver", ["exact", "cg", "lissa"])
def test_progress_is_called_and_its_exceptions_propagate(solver: str) -> None:
    op = DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)))
    calls: list[tuple[str, int, int]] = []
    solve(op, torch.ones(3, dtype=torch.float64), solver, progress=lambda *a: calls.append(a))
    assert calls and all(phase in ("solve", "power_iteration") and 0 <= done <= total
                         for phase, done, total in calls)

    def cancel(phase: str, done: int, total: int) -> None:
        raise _Cancelled

    with pytest.raises(_Cancelled):
        solve(op, torch.ones(3, dtype=torch.float64), solver, progress=cancel)


def test_jacobi_preconditioned_cg() -> None:
    # Badly scaled SPD matrix: a diagonal over six decades plus a weak coupling.
    rng = np.random.default_rng(0)
    scales = np.logspace(-3, 3, 40)
    G = rng.normal(size=(40, 40)) / 40
    M = np.diag(scales) + np.sqrt(np.outer(scales, scales)) * (G @ G.T) * 0.5
    op = DenseOperator(torch.tensor(M))
    B = torch.tensor(rng.normal(size=(40, 2)))
    ref = np.linalg.solve(M, B.numpy())

    x_plain, plain = solve(op, B, "cg", tol=1e-10, max_iter=2000)
    x_pcg, pcg = solve(op, B, "cg", tol=1e-10, preconditioner="jacobi")
    x_given, _ = solve(op, B, "cg", tol=1e-10, preconditioner=torch.tensor(np.diag(M)))
    for x in (x_plain, x_pcg, x_given):
        np.testing.assert_allclose(x.numpy(), ref, rtol=1e-6, atol=1e-9)
    assert pcg.details["preconditioner"] == "jacobi"
    assert pcg.iterations < plain.iterations / 2
    with pytest.raises(SpecError, match="unknown preconditioner"):
        solve(op, B, "cg", preconditioner="ilu")


def test_exact_indefinite_float32_keeps_small_regularized_eigenvalues() -> None:
    # Eigenvalues from 1e-3 (a penalty-sized floor) to 1e2, one negative: a float32
    # Hessian like the Adult MLP's. A rank cutoff of d·eps·max (2.4e-3 here) would treat
    # the 1e-3 directions as a null space and drop them.
    rng = np.random.default_rng(4)
    d = 200
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    evals = np.r_[-2e-3, np.full(150, 1e-3), np.geomspace(1e-2, 1e2, d - 151)]
    A = (q * evals) @ q.T
    b = rng.normal(size=d)
    expected = np.linalg.solve(A, b)

    x, report = solve(DenseOperator(torch.tensor(A, dtype=torch.float32)),
                      torch.tensor(b, dtype=torch.float32), solver="exact")

    assert report.details["method"] == "eigh"
    assert report.details["negative_eigenvalues"] == 1
    assert report.details["null_space_dim"] == 0
    assert report.relative_residual < 1e-2  # float32 products at condition 1e5
    got = x.double().numpy()
    assert np.linalg.norm(got - expected) <= 2e-2 * np.linalg.norm(expected)


@pytest.mark.parametrize("solver", ["exact", "cg", "lissa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_right_hand_side_column_is_solved_not_diverged(solver: str, dtype) -> None:
    # Leave-one-out of a row with p − y == 0 in float32 gives an exactly zero column.
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    A = (q * np.linspace(1.0, 2.0, 6)) @ q.T
    B = np.zeros((6, 2))
    B[:, 1] = rng.normal(size=6)

    x, report = solve(DenseOperator(torch.tensor(A, dtype=dtype)), torch.tensor(B, dtype=dtype),
                      solver=solver, **({"tol": 1e-5} if solver != "exact" else {}))

    assert not report.diverged and math.isfinite(report.relative_residual)
    assert torch.all(x[:, 0] == 0)
    np.testing.assert_allclose(x[:, 1].double().numpy(), np.linalg.solve(A, B[:, 1]),
                               rtol=1e-3, atol=1e-4)
