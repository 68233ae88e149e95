"""Solvers for C x = v with one or many right-hand sides (v (d,) or (d, m)).

`solve(op, rhs, solver)` with solver in:
  "exact"  dense C (d × d), Cholesky; eigendecomposition when C is not positive definite
  "cg"     conjugate gradient on the full-data operator, columns solved side by side
  "lissa"  stochastic Neumann series on fresh minibatches (the paper's solver)
  "auto"   exact when d <= AUTO_EXACT_MAX_D, else CG
Every solve returns (x, SolveReport); the report's relative residual ‖Cx − v‖/‖v‖ is
measured on the full-data operator (worst column). A diverged solve raises
`SolverDiverged` carrying its report; its iterate is never returned.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from engine.errors import SolverDiverged, SpecError
from engine.operators import LinearOperator, dense_matrix, power_iteration

logger = logging.getLogger(__name__)

# Limitation: "exact" materializes d × d (d = 2000: 32 MB in float64) and, for the Hessian,
# costs d products; above this size "auto" uses CG instead.
AUTO_EXACT_MAX_D = 2000  # dense d × d solves are cheap and exact below this size
# An exact solve counts as converged below max(1e-6, factor·eps(dtype)): 1e-6 in float64,
# 1.2e-4 in float32, where a Cholesky solve of a condition-1e4 matrix already leaves ~1e-6.
EXACT_TOL = 1e-6
EXACT_TOL_EPS_FACTOR = 1e3
CG_TOL = 1e-6  # relative residual at which CG stops
CG_MAX_ITER = 1000  # products per column before CG gives up (not converged, not diverged)
LISSA_DEPTH = 1000  # recursion steps J per repetition
LISSA_BATCH = 512  # rows per stochastic product
LISSA_SCALE_MARGIN = 1.05  # automatic σ = margin × λ_max(C) estimated by power iteration
LISSA_TOL = 1e-3  # residual under which a LiSSA solve counts as converged
LISSA_GROWTH = 4.0  # ‖u_j‖ > growth·(j+1)·‖v‖ can only happen when the series diverges
SOLVERS = ("auto", "exact", "cg", "lissa")
Progress = Callable[[str, int, int], None]


def _no_progress(phase: str, done: int, total: int) -> None:
    return None


@dataclass
class SolveReport:
    """What a solve did. `iterations`: CG steps or LiSSA steps (all repetitions);
    `products`: curvature-vector products, one per column; `wall_time` in seconds."""

    solver: str
    iterations: int = 0
    products: int = 0
    wall_time: float = 0.0
    relative_residual: float = math.nan
    converged: bool = False
    diverged: bool = False
    message: str = ""
    scale: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (NaN residuals become None)."""
        out = asdict(self)
        if not math.isfinite(self.relative_residual):
            out["relative_residual"] = None
        return out


def _columns(v: Tensor) -> Tensor:
    return v.unsqueeze(1) if v.dim() == 1 else v


def _norm_floor(V: Tensor) -> Tensor:
    """Column norms of V floored at the dtype's smallest normal number (1e-300 is 0 in
    float32, and a zero right-hand side then gave 0/0)."""
    return torch.clamp(torch.linalg.norm(V, dim=0), min=torch.finfo(V.dtype).tiny)


def relative_residual(op: LinearOperator, x: Tensor, v: Tensor) -> float:
    """max over columns of ‖C x − v‖ / ‖v‖ (a zero column counts as solved when x is zero)."""
    X, V = _columns(x), _columns(v)
    res = torch.linalg.norm(_columns(op.matvec(X)) - V, dim=0)
    ref = torch.linalg.norm(V, dim=0)
    rel = torch.where(ref > 0, res / _norm_floor(V), res)
    value = float(rel.max())
    return value if math.isfinite(value) else math.inf


def solve(op: LinearOperator, rhs: Tensor, solver: str = "auto", **options: Any
          ) -> tuple[Tensor, SolveReport]:
    """Solve C x = rhs. Options by solver:
    exact: none. cg: tol, max_iter, x0, preconditioner (None, "jacobi" or a (d,) diagonal).
    lissa: depth, repeats, batch_size, scale (None =
    automatic), damping (added to C's own), seed, tol, check_every (0 = never stop early).
    Every solver takes `progress(phase, done, total)`, called once per iteration (phase
    "solve"); an exception it raises (e.g. a cancel) propagates out of `solve`.
    """
    if solver not in SOLVERS:
        raise SpecError(f"unknown solver {solver!r} (known: {', '.join(SOLVERS)})")
    if rhs.shape[0] != op.d or rhs.dim() not in (1, 2):
        raise SpecError(f"right-hand side has shape {list(rhs.shape)}, expected ({op.d},) "
                        f"or ({op.d}, m)")
    rhs = rhs.to(op.device, op.dtype)
    if not bool(torch.isfinite(rhs).all()):
        raise SpecError("right-hand side contains NaN or inf")
    if solver == "auto":
        solver = "exact" if op.d <= AUTO_EXACT_MAX_D else "cg"
    allowed = {"exact": set(), "cg": {"tol", "max_iter", "x0", "preconditioner"},
               "lissa": {"depth", "repeats", "batch_size", "scale", "damping", "seed", "tol",
                         "check_every"}}[solver] | {"progress"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise SpecError(f"unknown option {unknown[0]!r} for solver {solver!r} "
                        f"(allowed: {', '.join(sorted(allowed)) or 'none'})")

    start = time.perf_counter()
    if solver == "exact":
        progress = options.get("progress") or _no_progress
        progress("solve", 0, 1)
        x, report = _exact(op, rhs)
        progress("solve", 1, 1)
    elif solver == "cg":
        x, report = _cg(op, rhs, **options)
    else:
        x, report = _lissa(op, rhs, **options)
    report.wall_time = time.perf_counter() - start
    logger.info("solve %s: %d iterations, residual %.3g, %.3fs", report.solver,
                report.iterations, report.relative_residual, report.wall_time)
    if report.diverged:
        raise SolverDiverged(f"{report.solver} diverged: {report.message}", report)
    return x, report


# ---- exact ------------------------------------------------------------------------------

def _exact(op: LinearOperator, rhs: Tensor) -> tuple[Tensor, SolveReport]:
    report = SolveReport(solver="exact")
    dense = getattr(op, "dense", None)
    A = dense() if callable(dense) else dense_matrix(op)
    report.products = op.d
    if not bool(torch.isfinite(A).all()):
        report.diverged = True
        report.message = "the curvature matrix contains NaN or inf"
        return rhs, report

    B = _columns(rhs)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        X = torch.cholesky_solve(B, L)
        report.details["method"] = "cholesky"
    else:
        # Not positive definite: solve in the eigenbasis (float64, so a float32 matrix
        # is solved as given), treating eigenvalues within the matrix's own rounding of
        # zero as a null space (minimum-norm solution). The entries carry relative
        # errors of eps(dtype), so eigenvalues move by about √d·eps·‖A‖; the rank
        # cutoff d·eps·‖A‖ would drop penalty-sized eigenvalues of a float32 Hessian.
        evals, evecs = torch.linalg.eigh(A.double())
        cutoff = evals.abs().max() * math.sqrt(A.shape[0]) * torch.finfo(A.dtype).eps
        keep = evals.abs() > cutoff
        inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)),
                          torch.zeros_like(evals))
        X = (evecs @ (inv[:, None] * (evecs.T @ B.double()))).to(A.dtype)
        report.details.update(method="eigh", min_eigenvalue=float(evals[0]),
                              negative_eigenvalues=int((evals < -cutoff).sum()),
                              null_space_dim=int((~keep).sum()))
        logger.info("exact solve: matrix not positive definite (min eigenvalue %.3g)",
                    float(evals[0]))
    x = X[:, 0] if rhs.dim() == 1 else X
    report.iterations = 1
    report.relative_residual = _dense_residual(A, X, B)
    report.converged = report.relative_residual < max(
        EXACT_TOL, EXACT_TOL_EPS_FACTOR * torch.finfo(A.dtype).eps)
    report.diverged = not math.isfinite(report.relative_residual)
    if report.diverged:
        report.message = "non-finite solution"
    return x, report


def _dense_residual(A: Tensor, X: Tensor, B: Tensor) -> float:
    res = torch.linalg.norm(A @ X - B, dim=0)
    res = torch.where(torch.linalg.norm(B, dim=0) > 0, res / _norm_floor(B), res)
    value = float(res.max())
    return value if math.isfinite(value) else math.inf


# ---- conjugate gradient -----------------------------------------------------------------

def _jacobi(op: LinearOperator, preconditioner: str | Tensor | None) -> Tensor | None:
    """Inverse diagonal (d,) for preconditioned CG, or None."""
    if preconditioner is None:
        return None
    if isinstance(preconditioner, str):
        if preconditioner != "jacobi":
            raise SpecError(f"cg: unknown preconditioner {preconditioner!r} (known: jacobi)")
        diagonal = getattr(op, "diagonal", None)
        if not callable(diagonal):
            raise SpecError("cg: this operator has no diagonal for a Jacobi preconditioner")
        diag = diagonal()
    else:
        diag = preconditioner.to(op.device, op.dtype)
    if diag.shape != (op.d,) or not bool(torch.isfinite(diag).all()):
        raise SpecError(f"cg: the preconditioner diagonal must be finite with shape ({op.d},)")
    # Zero entries (e.g. unpenalized dead units) would blow up: floor them relative to the max.
    floor = float(diag.abs().max()) * 1e-8 or 1.0
    return 1.0 / torch.clamp(diag, min=floor)


def _cg(op: LinearOperator, rhs: Tensor, tol: float = CG_TOL, max_iter: int = CG_MAX_ITER,
        x0: Tensor | None = None, progress: Progress | None = None,
        preconditioner: str | Tensor | None = None) -> tuple[Tensor, SolveReport]:
    """(Preconditioned) CG, columns side by side; stops on ‖r‖/‖b‖ <= tol per column.

    The Jacobi option is opt-in: on the MLPs of bench/bench_solvers.py the Fisher's
    diagonal did not cut iterations (13 -> 16 products), so plain CG stays the default.
    """
    report = SolveReport(solver="cg")
    progress = progress or _no_progress
    inv_diag = _jacobi(op, preconditioner)
    if inv_diag is not None:
        report.details["preconditioner"] = "jacobi"

    def precondition(R: Tensor) -> Tensor:
        return R if inv_diag is None else inv_diag[:, None] * R

    B = _columns(rhs)
    m = B.shape[1]
    X = torch.zeros_like(B) if x0 is None else _columns(x0.to(B)).clone()
    R = B - _columns(op.matvec(X)) if x0 is not None else B.clone()
    report.products += m if x0 is not None else 0
    Z = precondition(R)
    P = Z.clone()
    rz = (R * Z).sum(0)
    bnorm = _norm_floor(B)
    active = torch.linalg.norm(R, dim=0) / bnorm > tol
    history: list[float] = []

    while bool(active.any()) and report.iterations < max_iter:
        progress("solve", report.iterations, max_iter)
        cols = torch.nonzero(active).squeeze(1)
        AP = _columns(op.matvec(P[:, cols]))
        report.products += int(cols.numel())
        report.iterations += 1
        pAp = (P[:, cols] * AP).sum(0)
        if not bool(torch.isfinite(AP).all()):
            report.diverged = True
            report.message = "non-finite curvature product"
            break
        if bool((pAp <= 0).any()):
            # CG's line search needs pᵀCp > 0; otherwise the quadratic is unbounded below.
            report.diverged = True
            report.details["negative_curvature"] = True
            report.details["min_pCp_ratio"] = float(
                (pAp / (P[:, cols] * P[:, cols]).sum(0)).min())
            report.message = "negative curvature (pᵀCp <= 0): the operator is not " \
                             "positive definite"
            break
        alpha = rz[cols] / pAp
        X[:, cols] += alpha * P[:, cols]
        R[:, cols] -= alpha * AP
        Z_cols = precondition(R[:, cols])
        rz_new = (R[:, cols] * Z_cols).sum(0)
        beta = rz_new / rz[cols]
        P[:, cols] = Z_cols + beta * P[:, cols]
        rz[cols] = rz_new
        rel = torch.linalg.norm(R, dim=0) / bnorm
        history.append(float(rel.max()))
        active = rel > tol

    x = X[:, 0] if rhs.dim() == 1 else X
    report.details["residual_history"] = history[-50:]
    if report.diverged:
        report.relative_residual = math.inf
        return x, report
    report.relative_residual = relative_residual(op, X, B)
    report.products += m
    report.converged = report.relative_residual <= max(tol, 1e-12) * 10
    if not report.converged:
        report.message = f"not converged after {report.iterations} iterations"
    return x, report


# ---- LiSSA ------------------------------------------------------------------------------

def _lissa(op: LinearOperator, rhs: Tensor, depth: int = LISSA_DEPTH, repeats: int = 1,
           batch_size: int = LISSA_BATCH, scale: float | None = None, damping: float = 0.0,
           seed: int = 0, tol: float = LISSA_TOL, check_every: int = 0,
           progress: Progress | None = None) -> tuple[Tensor, SolveReport]:
    """u_0 = v, u_j = v + (I − (C_B + δ)/σ) u_{j−1}, x = u_J / σ, averaged over repeats."""
    if depth < 1 or repeats < 1:
        raise SpecError("lissa: depth and repeats must be >= 1")
    if scale is not None and not scale > 0:
        raise SpecError(f"lissa: scale must be > 0, got {scale}")
    report = SolveReport(solver="lissa")
    progress = progress or _no_progress
    if scale is None:
        before = int(getattr(op, "products", 0))
        lam = power_iteration(op, iters=50, tol=1e-3, seed=seed, progress=progress)
        report.details["lambda_max_estimate"] = lam
        report.details["power_iteration_products"] = int(getattr(op, "products", 0)) - before
        scale = LISSA_SCALE_MARGIN * (lam + damping)
    report.scale = float(scale)
    make_batch = getattr(op, "minibatch", None)
    # With exact products (a batch of every row) C u_{j−1} is the full-data product, so the
    # residual of x_{j−1} = u_{j−1}/σ comes for free and the series can stop at `tol`.
    exact_products = (not callable(make_batch) or batch_size >= getattr(op, "rows", 0))
    free_residual = exact_products and repeats == 1 and damping == 0.0

    V = _columns(rhs)
    vnorm = _norm_floor(V)
    total = torch.zeros_like(V)
    best = math.inf
    for r in range(repeats):
        stochastic = make_batch(batch_size, seed + r) if callable(make_batch) else op
        U = V.clone()
        for j in range(1, depth + 1):
            progress("solve", r * depth + j - 1, repeats * depth)
            CU = _columns(stochastic.matvec(U))
            if free_residual and j > 1:
                res_prev = float((torch.linalg.norm(CU / scale - V, dim=0) / vnorm).max())
                if res_prev <= tol:
                    report.details["stopped_at_step"] = j - 1
                    return _finish_lissa(op, U / scale, rhs, damping, tol, report)
            U = V + (1.0 - damping / scale) * U - CU / scale
            report.iterations += 1
            report.products += V.shape[1]
            # Limitation: this growth bound only catches divergence faster than linear;
            # a barely negative eigenvalue diverges slowly and is caught by the final
            # residual check (> 1) instead, after the full depth.
            growth = torch.linalg.norm(U, dim=0) / vnorm
            if not bool(torch.isfinite(U).all()) or bool((growth > LISSA_GROWTH * (j + 1)).any()):
                report.diverged = True
                report.message = (f"the series grew at step {j} of repetition {r}: the "
                                  f"curvature is indefinite or the scale {scale:.3g} is "
                                  f"too small")
                report.relative_residual = math.inf
                return U[:, 0] if rhs.dim() == 1 else U, report
            if check_every and j % check_every == 0:
                X = (total + U / scale) / (r + 1)
                res = relative_residual(op, X, V)
                report.details.setdefault("residual_checks", []).append([j, res])
                best = min(best, res)
                if res <= tol:
                    total = total + U / scale
                    report.details["stopped_at_step"] = j
                    return _finish_lissa(op, total / (r + 1), rhs, damping, tol, report)
                if res > 10 * best and res > 1.0:
                    report.diverged = True
                    report.message = f"residual grew to {res:.3g} at step {j}"
                    report.relative_residual = res
                    return X[:, 0] if rhs.dim() == 1 else X, report
        total = total + U / scale
    return _finish_lissa(op, total / repeats, rhs, damping, tol, report)


def _finish_lissa(op: LinearOperator, X: Tensor, rhs: Tensor, damping: float, tol: float,
                  report: SolveReport) -> tuple[Tensor, SolveReport]:
    V = _columns(rhs)
    report.relative_residual = relative_residual(op, X, V)
    report.converged = report.relative_residual <= tol
    if report.relative_residual > 1.0:
        # Worse than x = 0: the series did not approximate C⁻¹ v.
        report.diverged = True
        report.message = f"relative residual {report.relative_residual:.3g} > 1"
    elif not report.converged:
        report.message = f"residual {report.relative_residual:.3g} above tol {tol:.3g}"
    return (X[:, 0] if rhs.dim() == 1 else X), report
