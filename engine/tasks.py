"""The engine's tasks: influence on any objective, unlearning, attribution, fairness
influence and approximate CV.

Every task takes a trained `Problem` (θ̂ = its in-scope parameters, a minimizer of
L(θ; 1) = (1/n) Σ ℓ_i + λπ), a curvature `method` and a `solver` with `solver_options`
(`damping` δ and the operator `variant` are taken out of them, the rest go to
`engine.solvers.solve`) and an optional progress(phase, done, total) callback. Both
methods add the penalty's curvature λ∇²π (its smooth part: the l2 term of an elastic
net, nothing for l1 or group lasso) and δI to the curvature of the mean data loss:
"fisher" (AFIF): C = F + λ∇²π + δI, F the Fisher / Gauss-Newton matrix of the data
term; "hessian" (the infinitesimal jackknife): C = H_data + λ∇²π + δI, H_data = F + R
the exact Hessian of the mean data loss, so C is the Hessian of L(θ; 1) plus δI.

Conventions (docs/engine-api.md): removing a set S sets w_i = 0 and keeps the 1/n, so
θ̃ = θ̂ + (1/n) C⁻¹ Σ_{i∈S} g_i, and a score is the linearized change of an objective
when the row is removed, (1/n) sᵀ g_i with s = C⁻¹∇T ("removal" convention).
Non-smooth penalties (l1, elastic net, group lasso) use the proximal form in the
metric M = F + δ of the data term (AFIF.md §3).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from engine.errors import EngineError, SpecError
from engine.objectives import (
    Objective,
    accuracy,
    is_classifier,
    make_fairness_objective,
    mean_loss,
    mean_squared_error,
)
from engine.operators import (
    CurvatureOperator,
    DenseOperator,
    curvature_operator,
    dense_matrix,
    loss_directional_derivatives,
    mean_gradient,
    per_sample_gradients,
)
from engine.problem import Problem
from engine.prox import PROX_MAX_ITER, PROX_TOL, fisher_prox
from engine.results import PhaseTimer, Progress, ProgressFn, TaskResult
from engine.solvers import AUTO_EXACT_MAX_D, solve

logger = logging.getLogger(__name__)

METHODS = ("fisher", "hessian")
POLICIES = ("auto", "all")
# Right-hand sides scored together in one vmapped forward-mode pass (memory grows with it).
SCORE_COLUMNS = 32
# Candidate counts tried by the fairness policy "auto" (a geometric grid up to the cap).
FAIRNESS_GRID_POINTS = 24
# Largest d for which the proximal step materializes the metric M as a dense matrix;
# above it the prox runs matrix-free (one pass over the data per iteration).
DENSE_PROX_MAX_D = 2048
# Proximal-step iteration caps and relative-step tolerances: dense iterations cost
# microseconds, so they run to rounding; matrix-free ones use the prox module's defaults.
PROX_MAX_ITER_DENSE = 50000
PROX_TOL_DENSE = 1e-13
PROX_MAX_ITER_MATFREE = PROX_MAX_ITER
PROX_TOL_MATFREE = PROX_TOL
# Safety factor on λ_max(M) for the step size 1/L when M is dense (exact eigenvalue).
PROX_LIPSCHITZ_MARGIN = 1.01
# A model is flagged as not trained to a minimizer when ‖∇L(θ̂)‖ exceeds this fraction of
# a typical per-row gradient norm (a converged fit sits orders of magnitude below it).
STATIONARITY_WARN_RATIO = 1e-3
# Rows sampled (and rows per vmapped chunk) to estimate the typical per-row gradient norm.
STATIONARITY_SAMPLE_ROWS = 16
STATIONARITY_CHUNK_ROWS = 4


# ---------------------------------------------------------------------------------
# Shared machinery


def _rows(problem: Problem, rows: Any, what: str) -> Tensor:
    """Validate a list of training-row indices: integers in [0, n), no repeats."""
    if isinstance(rows, Tensor):
        rows = rows.detach().cpu().numpy()
    arr = np.asarray(rows if rows is not None else [])
    if arr.ndim != 1:
        raise SpecError(f"{what} must be a flat list of row indices, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating) or not np.all(arr == np.round(arr)):
            raise SpecError(f"{what} must contain integer row indices")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= problem.n):
        bad = int(arr[(arr < 0) | (arr >= problem.n)][0])
        raise SpecError(f"{what} has row index {bad} outside [0, {problem.n})")
    if np.unique(arr).size != arr.size:
        raise SpecError(f"{what} repeats a row index")
    return torch.as_tensor(arr, device=problem.device)


def _removal_sum(problem: Problem, rows: Tensor) -> Tensor:
    """(1/n) Σ_{i∈rows} g_i at θ̂, (d,); zero for no rows."""
    if rows.numel() == 0:
        return torch.zeros(problem.d, dtype=problem.dtype, device=problem.device)
    return mean_gradient(problem, indices=rows) * (rows.numel() / problem.n)


def _problem_at(problem: Problem, theta: Tensor) -> Problem:
    """A copy of the problem with in-scope parameters θ (the original is untouched)."""
    other = problem.clone()
    other.set_theta(theta)
    return other


def _stationarity(problem: Problem, weights: Tensor) -> float:
    """How far the problem's θ is from a minimizer of L(θ; w).

    Smooth penalty: ‖∇L(θ; w)‖. Non-smooth: the norm of the unit-step gradient mapping
    ‖θ − prox_{λπ}(θ − ∇_data L(θ; w))‖, zero exactly at a minimizer.
    """
    grad = mean_gradient(problem, weights=weights)
    theta = problem.theta()
    if problem.regularizer.smooth:
        return float(torch.linalg.norm(grad + problem.reg_grad(theta)))
    return float(torch.linalg.norm(theta - problem.reg_prox(theta - grad, 1.0)))


@dataclass
class _Curvature:
    """The method, the solver and its options for one task, plus a log of solves."""

    method: str
    solver: str
    damping: float
    variant: str | None
    options: dict[str, Any]
    progress: Progress
    reports: list[dict[str, Any]]
    prox_reports: list[dict[str, Any]]
    operators: list[tuple[Problem, bool, CurvatureOperator | DenseOperator]]

    @classmethod
    def build(cls, problem: Problem, method: str, solver: str,
              solver_options: dict[str, Any] | None, progress: Progress) -> _Curvature:
        if method not in METHODS:
            raise SpecError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        options = dict(solver_options or {})
        damping = float(options.pop("damping", 0.0))
        if not damping >= 0.0 or not math.isfinite(damping):
            raise SpecError(f"solver_options.damping must be a finite number >= 0, got {damping}")
        variant = options.pop("variant", None)
        if not problem.regularizer.smooth and method == "hessian":
            # Limitation: the proximal step needs a positive semi-definite metric; the
            # Hessian of a non-convex data term is not, so non-smooth penalties are
            # served by the Fisher only.
            raise SpecError(f"regularizer {problem.regularizer.kind} is not smooth: "
                            "use method='fisher' (proximal Fisher step)")
        return cls(method, solver, damping, variant, options, progress, [], [], [])

    def operator(self, problem: Problem, regularized: bool = True
                 ) -> CurvatureOperator | DenseOperator:
        """C at the problem's θ: the method's curvature (+ smooth penalty) + δ.

        When the solve is exact, C is materialized once per task and problem and reused
        by every later solve (scores, candidates, folds) instead of being rebuilt.
        """
        for known, known_regularized, cached in self.operators:
            if known is problem and known_regularized == regularized:
                return cached
        built = self.matrix_free(problem, regularized)
        exact = self.solver == "exact" or (self.solver == "auto" and problem.d <= AUTO_EXACT_MAX_D)
        op: CurvatureOperator | DenseOperator = DenseOperator(built.dense()) if exact else built
        self.operators.append((problem, regularized, op))
        return op

    def matrix_free(self, problem: Problem, regularized: bool = True) -> CurvatureOperator:
        """C at the problem's θ as products over the data (never materialized)."""
        return curvature_operator(problem, self.method, damping=self.damping,
                                  regularized=regularized, variant=self.variant)

    def solve(self, op: CurvatureOperator | DenseOperator | _WeightedCurvature, rhs: Tensor,
              phase: str) -> Tensor:
        """x = C⁻¹ rhs for rhs (d,) or (d, m); the report is kept for the result."""
        columns = 1 if rhs.dim() == 1 else rhs.shape[1]
        self.progress(phase, 0, columns)
        x, report = solve(op, rhs, solver=self.solver, progress=self.progress, **self.options)
        self.reports.append(report.to_dict())
        self.progress(phase, columns, columns)
        logger.info("%s solve: %d right-hand side(s), %s", phase, columns, report.to_dict())
        return x

    def removal_step(self, problem: Problem, sums: Tensor, phase: str = "solve") -> Tensor:
        """θ̃ for removal sums (1/n) Σ_{i∈S} g_i given as (d,) or (d, m) columns."""
        theta = problem.theta()
        if problem.regularizer.smooth:
            x = self.solve(self.operator(problem), sums, phase)
            return theta + x if sums.dim() == 1 else theta[:, None] + x

        # Proximal form: v = θ̂ − M⁻¹ b_w with b_w = ∇_data L(θ̂; 1) − sums, then the
        # prox of λπ in the metric M = F + δ of the data term.
        metric = self.operator(problem, regularized=False)
        full = mean_gradient(problem)
        b_w = full - sums if sums.dim() == 1 else full[:, None] - sums
        v = (theta if sums.dim() == 1 else theta[:, None]) - self.solve(metric, b_w, phase)
        result, reports = _metric_prox(problem, metric, v, theta, self.progress)
        self.prox_reports.extend(reports)
        return result

    def refine(self, problem: Problem, theta: Tensor, kept: Tensor) -> Tensor:
        """One (proximal) Newton step of L(·; w) from θ (w = 1 on `kept` rows, else 0),
        with the curvature of L(·; w) itself, rebuilt at θ."""
        at = _problem_at(problem, theta)
        weights = torch.zeros(problem.n, dtype=problem.dtype, device=problem.device)
        weights[kept] = 1.0
        grad = mean_gradient(at, weights=weights)
        smooth = problem.regularizer.smooth
        weighted = _WeightedCurvature(self.matrix_free(at, regularized=smooth), kept, problem.n)
        if smooth:
            return theta - self.solve(weighted, grad + at.reg_grad(theta), "refine")
        metric = weighted
        v = theta - self.solve(metric, grad, "refine")
        result, reports = _metric_prox(at, metric, v, theta, self.progress)
        self.prox_reports.extend(reports)
        return result

    def convergence(self) -> dict[str, Any]:
        """Top-level health of every solve (and proximal step) this task made.

        converged: all of them converged; max_relative_residual: the largest
        ‖Cx − v‖/‖v‖ over the solves (None when a residual was not finite or no solve
        ran). A task whose solves did not all converge still returns, with a warning.
        """
        residuals = [r.get("relative_residual") for r in self.reports]
        finite = [float(r) for r in residuals if r is not None and math.isfinite(r)]
        solves_ok = all(bool(r.get("converged")) for r in self.reports)
        prox_ok = all(bool(r.get("converged")) for r in self.prox_reports)
        worst = max(finite) if finite and len(finite) == len(residuals) else None
        if not (solves_ok and prox_ok):
            logger.warning("%s/%s: %d of %d solves and %d of %d proximal steps did not "
                           "converge (max relative residual %s); the result is approximate",
                           self.method, self.solver,
                           sum(not r.get("converged") for r in self.reports), len(self.reports),
                           sum(not r.get("converged") for r in self.prox_reports),
                           len(self.prox_reports), worst)
        return {"converged": solves_ok and prox_ok, "max_relative_residual": worst}

    def summary(self) -> dict[str, Any]:
        """JSON-able description of the curvature and every solve made."""
        return {"method": self.method, "solver": self.solver, "damping": self.damping,
                "variant": self.variant, "solves": self.reports,
                "prox": self.prox_reports[-20:]}


class _WeightedCurvature:
    """C_w v = (1/n) Σ_{i∈kept} M_i v (+ λ∇²π v) + δ v, the curvature of L(θ; w) for
    w = 1 on `kept` and 0 elsewhere, built from the full-data operator `base`."""

    def __init__(self, base: CurvatureOperator, kept: Tensor, n: int) -> None:
        self.base = base
        self.rows = CurvatureOperator(base.problem, base.kind, base.variant, damping=0.0,
                                      regularized=False, indices=kept,
                                      batch_size=base.batch_size)
        self.scale = kept.numel() / n
        self.d, self.dtype, self.device = base.d, base.dtype, base.device
        self.products = 0

    def matvec(self, v: Tensor) -> Tensor:
        v = v.to(self.device, self.dtype)
        self.products += 1 if v.dim() == 1 else v.shape[1]
        extra = self.base.damping * v
        if self.base.regularized:
            diag = self.base.problem.reg_curvature_diag()
            extra = extra + (diag if v.dim() == 1 else diag[:, None]) * v
        return self.scale * self.rows.data_product(v) + extra

    __call__ = matvec

    def dense(self) -> Tensor:
        return dense_matrix(self)


def _metric_prox(problem: Problem,
                 metric: CurvatureOperator | DenseOperator | _WeightedCurvature, v: Tensor,
                 start: Tensor, progress: Progress) -> tuple[Tensor, list[dict[str, Any]]]:
    """argmin_θ ½ (θ − v)ᵀ M (θ − v) + λπ(θ) per column of v ((d,) or (d, m)), warm
    started at `start` (d,), by `engine.prox.fisher_prox`. Small d: M is materialized
    once so each iteration is dense algebra instead of a pass over the data."""
    columns = v.unsqueeze(1) if v.dim() == 1 else v
    op: CurvatureOperator | _WeightedCurvature | DenseOperator = metric
    lipschitz, tol, max_iter = None, PROX_TOL_MATFREE, PROX_MAX_ITER_MATFREE
    if problem.d <= DENSE_PROX_MAX_D:
        op = DenseOperator(metric.dense())
        lipschitz = float(torch.linalg.eigvalsh(op.matrix)[-1]) * PROX_LIPSCHITZ_MARGIN
        tol, max_iter = PROX_TOL_DENSE, PROX_MAX_ITER_DENSE
        if not lipschitz > 0:
            raise SpecError("the proximal step's metric is zero: add damping in solver_options")

    out, reports = [], []
    for j in range(columns.shape[1]):
        x, report = fisher_prox(problem, columns[:, j], op=op, x0=start, tol=tol,
                                max_iter=max_iter, lipschitz=lipschitz)
        out.append(x)
        reports.append(report.to_dict())
        progress("prox", j + 1, columns.shape[1])
    stacked = torch.stack(out, dim=1)
    return (stacked[:, 0] if v.dim() == 1 else stacked), reports


def _outputs(problem: Problem, X: Tensor, theta: Tensor | None = None) -> Tensor:
    """Model outputs (m, K) on X at θ (default θ̂), without a graph, batch by batch."""
    params = None if theta is None else problem.unflatten(theta)
    with torch.no_grad():
        return torch.cat([problem.forward(params, X[i:i + problem.batch_size])
                          for i in range(0, X.shape[0], problem.batch_size)])


def evaluate(problem: Problem, objective: Objective, theta: Tensor | None = None) -> float:
    """Plug-in value T(θ) of an objective at θ (d,) (default θ̂), e.g. the mean loss of
    held-out rows at an unlearned model."""
    with torch.no_grad():
        return float(objective.fn(_outputs(problem, objective.X, theta)))


def objective_gradient(problem: Problem, objective: Objective) -> tuple[float, Tensor]:
    """T(θ̂) and ∇_θ T(θ̂), (d,): T is differentiated in output space, then each batch's
    output gradient is pulled back through the model (memory of one batch)."""
    outputs = _outputs(problem, objective.X).requires_grad_(True)
    with torch.enable_grad():
        value = objective.fn(outputs)
        (grad_out,) = torch.autograd.grad(value, outputs)

    leaves = {n: t.detach().requires_grad_(True) for n, t in problem.params().items()}
    total = torch.zeros(problem.d, dtype=problem.dtype, device=problem.device)
    size = problem.batch_size
    for start in range(0, objective.X.shape[0], size):
        with torch.enable_grad():
            f = problem.forward(leaves, objective.X[start:start + size])
            grads = torch.autograd.grad(f, list(leaves.values()),
                                        grad_outputs=grad_out[start:start + size],
                                        allow_unused=True)
        total += torch.cat([(g if g is not None else torch.zeros_like(leaves[n])).reshape(-1)
                            for n, g in zip(leaves, grads, strict=True)])
    return float(value.detach()), total


def _point_loss_gradients(problem: Problem, X: Tensor, y: Tensor) -> Tensor:
    """∇_θ ℓ(x_j, y_j) at θ̂ for each row, as columns (d, m) (vmap of per-row grads)."""
    params = problem.params()

    def one(x: Tensor, label: Tensor) -> Tensor:
        def loss(p: dict[str, Tensor]) -> Tensor:
            f = problem.forward(p, x.unsqueeze(0))
            return problem.family.loss(f, label.unsqueeze(0))[0]

        return problem.flatten(torch.func.grad(loss)(params))

    size = problem.batch_size
    rows = [torch.func.vmap(one)(X[i:i + size], y[i:i + size]) for i in range(0, X.shape[0], size)]
    return torch.cat(rows).T


def _scores(problem: Problem, s: Tensor, progress: Progress | None = None) -> Tensor:
    """Removal scores (1/n) sᵀ g_i for every training row: (n,) or (n, m) for s (d, m).

    One forward-mode pass of the per-row losses along each column of s, the columns
    vmapped in groups of SCORE_COLUMNS; no n × d gradient matrix is formed.
    """
    if s.dim() == 1:
        if progress is not None:
            progress("scoring", 0, 1)
        scores = loss_directional_derivatives(problem, s) / problem.n
        if progress is not None:
            progress("scoring", 1, 1)
        return scores

    params = problem.params()
    batches = list(problem.batches())
    out = []
    for b, idx in enumerate(batches):
        X, y = problem.X[idx], problem.y[idx]

        def losses(p: dict[str, Tensor], X: Tensor = X, y: Tensor = y) -> Tensor:
            return problem.family.loss(problem.forward(p, X), y)

        def along(column: Tensor) -> Tensor:
            return torch.func.jvp(losses, (params,), (problem.unflatten(column),))[1]

        groups = [torch.func.vmap(along, in_dims=1, out_dims=1)(s[:, a:a + SCORE_COLUMNS])
                  for a in range(0, s.shape[1], SCORE_COLUMNS)]
        out.append(torch.cat(groups, dim=1).detach())
        if progress is not None:
            progress("scoring", b + 1, len(batches))
    return torch.cat(out) / problem.n


def _influence_of(problem: Problem, curvature: _Curvature, grads: Tensor, timer: PhaseTimer,
                  report: Progress) -> tuple[Tensor, Tensor]:
    """The linearized removal effect on objectives with gradients ∇T (d,) or (d, m):
    one (batched) solve s = C⁻¹∇T, then one forward-mode scoring pass. Returns s and
    the removal scores (1/n) sᵀ g_i, (n,) or (n, m)."""
    # Limitation: for non-smooth penalties the scores use the smooth part of the
    # curvature only (the active set of θ̂ is treated as free), unlike unlearning and
    # cross-validation, which take the proximal step.
    with timer.phase("solve"):
        direction = curvature.solve(curvature.operator(problem), grads, "solve")

    with timer.phase("scoring"):
        scores = _scores(problem, direction, report)
    return direction, scores


def _stationarity_check(problem: Problem) -> tuple[dict[str, float], list[str]]:
    """How far θ̂ is from a minimizer of L(θ; 1), against a typical per-row gradient.

    Every task linearizes around a minimizer; a checkpoint taken mid-training (or never
    trained) makes scores and steps carry the pull toward the true minimizer. Returns
    `stationarity` (see `_stationarity`), `stationarity_ratio` (that over the rms of
    ‖g_i‖ on a few sampled rows) and a warning when the ratio is large.
    """
    gap = _stationarity(problem, torch.ones(problem.n, dtype=problem.dtype,
                                            device=problem.device))
    rows = torch.randperm(problem.n, generator=torch.Generator().manual_seed(0))
    rows = rows[:STATIONARITY_SAMPLE_ROWS].to(problem.device)
    squares = [per_sample_gradients(problem, chunk).square().sum(dim=1)
               for chunk in rows.split(STATIONARITY_CHUNK_ROWS)]
    typical = float(torch.cat(squares).mean().sqrt())
    ratio = gap / typical if typical > 0 else (0.0 if gap == 0 else math.inf)
    warnings = []
    if ratio > STATIONARITY_WARN_RATIO:
        warnings.append(
            f"the model is not at a minimizer of its training objective: the gradient norm "
            f"at its parameters is {gap:.3g}, {ratio:.2g} times a typical per-row gradient; "
            f"influence assumes a trained optimum, so train to convergence (or unlearn "
            f"with refine_steps) before trusting these numbers")
        logger.warning("%s", warnings[-1])
    return {"stationarity": gap, "stationarity_ratio": ratio}, warnings


def _finish(values: dict[str, Any], arrays: Mapping[str, Tensor | np.ndarray], timer: PhaseTimer,
            problem: Problem, curvature: _Curvature,
            parameters: dict[str, Tensor] | None = None) -> TaskResult:
    convergence = curvature.convergence()
    with timer.phase("diagnostics"):
        stationarity, warnings = _stationarity_check(problem)
    if not convergence["converged"]:
        warnings.append(
            f"a linear solve did not converge (largest relative residual "
            f"{convergence['max_relative_residual']}); raise the solver's iterations or "
            f"add damping")
    values = {**convergence, **stationarity, **values,
              "warnings": [*values.get("warnings", []), *warnings]}
    numpy_arrays = {k: (v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v))
                    for k, v in arrays.items()}
    return TaskResult(values=values, arrays=numpy_arrays, parameters=parameters,
                      timings=dict(timer.timings), device=str(problem.device))


# ---------------------------------------------------------------------------------
# Unlearning


def unlearn(
    problem: Problem,
    remove: Sequence[int] | np.ndarray | Tensor,
    method: str = "fisher",
    solver: str = "auto",
    solver_options: dict[str, Any] | None = None,
    refine_steps: int = 0,
    progress: ProgressFn | None = None,
) -> TaskResult:
    """Remove training rows S without retraining: θ̃ = θ̂ + (1/n) C⁻¹ Σ_{i∈S} g_i
    (proximal form for non-smooth penalties), then `refine_steps` further (proximal)
    Newton steps on L(θ; w) with w_S = 0, each one gradient pass and one solve.

    parameters: the full new state dict (out-of-scope tensors untouched). values:
    n_removed, parameter_change_norm ‖θ̃ − θ̂‖, stationarity of L(·; w) at θ̂, after
    the step and after each refinement (gradient norm, or gradient-mapping norm for
    non-smooth penalties), and the solver reports.
    """
    timer, report = PhaseTimer(), Progress(progress)
    rows = _rows(problem, remove, "remove")
    if not isinstance(refine_steps, int) or refine_steps < 0:
        raise SpecError(f"refine_steps must be an integer >= 0, got {refine_steps!r}")
    curvature = _Curvature.build(problem, method, solver, solver_options, report)
    weights = torch.ones(problem.n, dtype=problem.dtype, device=problem.device)
    weights[rows] = 0.0
    kept = torch.nonzero(weights).squeeze(1)
    theta_hat = problem.theta()

    with timer.phase("gradient"):
        report("gradient", 0, 1)
        sums = _removal_sum(problem, rows)
        stationarity_before = _stationarity(problem, weights)
        report("gradient", 1, 1)

    # Limitation: one Newton step misses high-leverage rows (error ratio against
    # retraining up to ~0.6 for single rows of L2 logistic regression on breast_cancer,
    # median 0.003): C still contains the removed rows' own curvature and the loss is
    # only locally quadratic, so a row that dominates its direction moves θ further than
    # the linearization predicts. refine_steps=1 (curvature of L(·; w) itself) fixes it.
    with timer.phase("solve"):
        theta = curvature.removal_step(problem, sums)

    with timer.phase("diagnostics"):
        history = [_stationarity(_problem_at(problem, theta), weights)]

    for step in range(refine_steps):
        with timer.phase("refine"):
            theta = curvature.refine(problem, theta, kept)
            history.append(_stationarity(_problem_at(problem, theta), weights))
        report("refine", step + 1, refine_steps)

    if not bool(torch.isfinite(theta).all()):
        raise EngineError("unlearning produced non-finite parameters; add damping in "
                          "solver_options")
    values = {
        "n_removed": int(rows.numel()),
        "removed": rows.cpu().tolist() if rows.numel() <= 1000 else None,
        "parameter_change_norm": float(torch.linalg.norm(theta - theta_hat)),
        "refine_steps": refine_steps,
        "stationarity_before": stationarity_before,
        "stationarity_after_step": history[0],
        "stationarity_after": history[-1],
        "stationarity_history": history,
        "stationarity_measure": ("gradient_norm" if problem.regularizer.smooth
                                 else "gradient_mapping_norm"),
        "proximal": not problem.regularizer.smooth,
        "curvature": curvature.summary(),
    }
    arrays = {"removed": rows}
    return _finish(values, arrays, timer, problem, curvature, problem.state_dict(theta))


# ---------------------------------------------------------------------------------
# Influence on any objective

ObjectiveSpec = Objective | Callable[[dict[str, Tensor]], Tensor] | str | Mapping[str, Any]
NAMED_OBJECTIVES = ("train_loss", "mean_loss", "demographic_parity", "chi2")


def _named_objective(problem: Problem, spec: str | Mapping[str, Any]) -> Objective:
    """An `Objective` from a name or {"name": ..., arguments}.

    train_loss: mean training loss. mean_loss: {"X", "y"} mean loss on those rows.
    demographic_parity / chi2: {"sensitive"} on the training rows, or on {"X"} rows.
    """
    args = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = args.pop("name", None)
    if name not in NAMED_OBJECTIVES:
        raise SpecError(f"objective name must be one of {', '.join(NAMED_OBJECTIVES)}, "
                        f"got {name!r}")
    allowed = {"train_loss": set(), "mean_loss": {"X", "y"},
               "demographic_parity": {"sensitive", "X"}, "chi2": {"sensitive", "X"}}[name]
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise SpecError(f"objective {name} does not take {', '.join(unknown)}")
    if name == "train_loss":
        return mean_loss(problem.family, problem.X, problem.y, name="train_loss")
    if name == "mean_loss":
        if "X" not in args or "y" not in args:
            raise SpecError("objective mean_loss needs X and y")
        return mean_loss(problem.family, problem.as_inputs(args["X"]),
                         problem.as_labels(args["y"]))
    if "sensitive" not in args:
        raise SpecError(f"objective {name} needs sensitive")
    X = problem.X if args.get("X") is None else problem.as_inputs(args["X"])
    try:
        sensitive = torch.as_tensor(np.asarray(args["sensitive"], dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise SpecError(f"sensitive must be numeric: {exc}") from exc
    return make_fairness_objective(name, problem.family, X,
                                   sensitive.reshape(-1).to(problem.device, problem.dtype))


def _callable_gradient(problem: Problem,
                       fn: Callable[[dict[str, Tensor]], Tensor]) -> tuple[float, Tensor]:
    """T(θ̂) and ∇T(θ̂), (d,), for T given on the in-scope parameters (name -> tensor)."""
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in problem.params().items()}
    with torch.enable_grad():
        value = fn(leaves)
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise SpecError("objective callable must return a scalar tensor")
        if not value.requires_grad:
            raise SpecError("objective callable does not depend on the in-scope parameters")
        grads = torch.autograd.grad(value.reshape(()), list(leaves.values()), allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(leaves[n])).reshape(-1)
                      for n, g in zip(leaves, grads, strict=True)])
    return float(value.detach()), flat.to(problem.dtype)


def influence(
    problem: Problem,
    objective: ObjectiveSpec,
    method: str = "fisher",
    solver: str = "auto",
    solver_options: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
) -> TaskResult:
    """Influence of every training row on an objective T: one solve s = C⁻¹∇T(θ̂), then
    all n scores from one forward-mode pass (no n × d gradient matrix).

    objective: a callable T(params) -> scalar tensor, params the in-scope parameters
    (name -> tensor, e.g. evaluated with `problem.forward(params, X)`); an `Objective`;
    or a named one: "train_loss", {"name": "mean_loss", "X", "y"},
    {"name": "demographic_parity" | "chi2", "sensitive", "X" (default: training rows)}.

    arrays: scores (n,), scores[i] = (1/n) sᵀ g_i ≈ T(θ̃_{−i}) − T(θ̂) ("removal"
    convention: positive = removing row i raises T), direction (d,) = s.
    values: objective, objective_value T(θ̂), gradient_norm ‖∇T‖, curvature reports.
    """
    timer, report = PhaseTimer(), Progress(progress)
    curvature = _Curvature.build(problem, method, solver, solver_options, report)

    with timer.phase("gradient"):
        report("gradient", 0, 1)
        if isinstance(objective, Objective):
            name, (value, grad) = objective.name, objective_gradient(problem, objective)
        elif isinstance(objective, (str, Mapping)):
            resolved = _named_objective(problem, objective)
            name, (value, grad) = resolved.name, objective_gradient(problem, resolved)
        elif callable(objective):
            name = getattr(objective, "__name__", "callable")
            value, grad = _callable_gradient(problem, objective)
        else:
            raise SpecError("objective must be a callable, an Objective, a name or "
                            f"{{'name': ...}}, got {type(objective).__name__}")
        if not (math.isfinite(value) and bool(torch.isfinite(grad).all())):
            raise EngineError(f"objective {name} or its gradient is not finite at θ̂")
        report("gradient", 1, 1)

    direction, scores = _influence_of(problem, curvature, grad, timer, report)

    values = {
        "convention": "removal",
        "objective": name,
        "objective_value": value,
        "gradient_norm": float(torch.linalg.norm(grad)),
        "n_train": problem.n,
        "predicted_change_max": float(scores.max()),
        "predicted_change_min": float(scores.min()),
        "curvature": curvature.summary(),
    }
    arrays = {"scores": scores, "direction": direction}
    return _finish(values, arrays, timer, problem, curvature)


# ---------------------------------------------------------------------------------
# Attribution


def attribute(
    problem: Problem,
    X_test: Any,
    y_test: Any,
    top_k: int = 10,
    method: str = "fisher",
    solver: str = "auto",
    solver_options: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
) -> TaskResult:
    """Influence of every training row on each test point's loss (one batched solve).

    arrays: scores (n, m), scores[i, j] = predicted change of test loss j (nats) when
    training row i is removed ("removal" convention); mean_scores (n,), the predicted
    change of the mean test loss; helpful / harmful (m, top_k): per test point, the
    rows whose removal raises / lowers its loss most, strongest first (with their
    scores in helpful_scores / harmful_scores); test_losses (m,).
    """
    timer, report = PhaseTimer(), Progress(progress)
    X = problem.as_inputs(X_test)
    y = problem.as_labels(y_test)
    if X.shape[0] == 0 or X.shape[0] != y.shape[0]:
        raise SpecError(f"X_test has {X.shape[0]} rows and y_test {y.shape[0]}; need equal, > 0")
    if not isinstance(top_k, int) or top_k < 1:
        raise SpecError(f"top_k must be a positive integer, got {top_k!r}")
    k = min(top_k, problem.n)
    curvature = _Curvature.build(problem, method, solver, solver_options, report)

    with timer.phase("gradient"):
        report("gradient", 0, 1)
        gradients = _point_loss_gradients(problem, X, y)
        test_losses = problem.family.loss(_outputs(problem, X), y)
        report("gradient", 1, 1)

    _, scores = _influence_of(problem, curvature, gradients, timer, report)

    mean_scores = scores.mean(dim=1)
    helpful_scores, helpful = torch.topk(scores, k, dim=0, largest=True)
    harmful_scores, harmful = torch.topk(scores, k, dim=0, largest=False)
    mean_helpful = torch.topk(mean_scores, k, largest=True).indices
    mean_harmful = torch.topk(mean_scores, k, largest=False).indices
    values = {
        "convention": "removal",
        "n_train": problem.n,
        "n_test": int(X.shape[0]),
        "top_k": k,
        "mean_test_loss": float(test_losses.mean()),
        "mean_helpful": mean_helpful.cpu().tolist(),
        "mean_harmful": mean_harmful.cpu().tolist(),
        "curvature": curvature.summary(),
    }
    arrays = {
        "scores": scores, "mean_scores": mean_scores, "test_losses": test_losses,
        "helpful": helpful.T, "helpful_scores": helpful_scores.T,
        "harmful": harmful.T, "harmful_scores": harmful_scores.T,
    }
    return _finish(values, arrays, timer, problem, curvature)


# ---------------------------------------------------------------------------------
# Fairness


def _utility(problem: Problem, outputs: Tensor) -> float:
    """Accuracy for classifiers, mean squared error of the predicted mean otherwise."""
    if is_classifier(problem.family):
        return accuracy(problem.family, outputs, problem.y)
    return mean_squared_error(problem.family, outputs, problem.y)


def _count_grid(cap: int, points: int) -> list[int]:
    """Distinct removal counts 1..cap on a geometric grid (always including cap)."""
    if cap < 1:
        return []
    grid = np.unique(np.round(np.geomspace(1, cap, num=min(points, cap))).astype(int))
    return [int(c) for c in grid]


def fairness(
    problem: Problem,
    sensitive: Any,
    metric: str = "demographic_parity",
    unlearn: bool = True,
    policy: str = "auto",
    method: str = "fisher",
    solver: str = "auto",
    solver_options: dict[str, Any] | None = None,
    max_fraction: float = 0.2,
    max_accuracy_drop: float = 0.01,
    progress: ProgressFn | None = None,
) -> TaskResult:
    """Score every training row on a fairness metric measured on the training rows and
    optionally unlearn rows whose removal lowers it.

    metric: "demographic_parity" (binary classifier, two-valued sensitive) or "chi2"
    (KDE χ² between predicted mean and a binary or continuous sensitive; any family
    with a scalar prediction). scores (n,): linearized change of the metric when the
    row is removed ("removal" convention); negative = removal lowers the metric.

    policy "all": unlearn every row with a negative score (the paper's rule).
    policy "auto": rank those rows, evaluate the plug-in metric at θ̃ for a geometric
    grid of counts (one batched solve), keep the counts that remove at most
    max_fraction·n rows and lose at most max_accuracy_drop accuracy (regression: raise
    the MSE by at most that fraction), and take the lowest metric (no removal if none
    beats θ̂). metric_after / accuracy_after (or mse_after) are evaluated at the
    returned model.
    """
    timer, report = PhaseTimer(), Progress(progress)
    if policy not in POLICIES:
        raise SpecError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if not 0.0 < max_fraction <= 1.0:
        raise SpecError(f"max_fraction must lie in (0, 1], got {max_fraction}")
    if not max_accuracy_drop >= 0.0:
        raise SpecError(f"max_accuracy_drop must be >= 0, got {max_accuracy_drop}")
    try:
        s = torch.as_tensor(np.asarray(sensitive, dtype=np.float64)).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"sensitive must be numeric: {exc}") from exc
    objective = make_fairness_objective(metric, problem.family, problem.X,
                                        s.to(problem.device, problem.dtype))
    curvature = _Curvature.build(problem, method, solver, solver_options, report)
    classifier = is_classifier(problem.family)
    utility_name = "accuracy" if classifier else "mse"

    with timer.phase("gradient"):
        report("gradient", 0, 1)
        metric_before, grad = objective_gradient(problem, objective)
        utility_before = _utility(problem, _outputs(problem, problem.X))
        report("gradient", 1, 1)

    # The plug-in values of policy "auto" below take the proximal step for non-smooth
    # penalties; the scores themselves are linearized (see _influence_of).
    _, scores = _influence_of(problem, curvature, grad, timer, report)

    values: dict[str, Any] = {
        "convention": "removal",
        "metric": metric,
        "metric_before": metric_before,
        f"{utility_name}_before": utility_before,
        "n_lowering": int((scores < 0).sum()),
        "predicted_change_all": float(scores[scores < 0].sum()),
    }
    arrays: dict[str, Tensor | np.ndarray] = {"scores": scores}
    if not unlearn:
        values["curvature"] = curvature.summary()
        return _finish(values, arrays, timer, problem, curvature)

    order = torch.argsort(scores)
    candidates = order[: int((scores < 0).sum())]

    def plug_in(theta: Tensor) -> tuple[float, float]:
        outputs = _outputs(problem, problem.X, theta)
        return float(objective.fn(outputs)), _utility(problem, outputs)

    def feasible(utility: float) -> bool:
        if classifier:
            return utility >= utility_before - max_accuracy_drop
        return utility <= utility_before * (1.0 + max_accuracy_drop)

    curve: list[dict[str, Any]] = []
    if policy == "all":
        chosen = int(candidates.numel())
        with timer.phase("unlearn"):
            theta = curvature.removal_step(problem, _removal_sum(problem, candidates), "unlearn")
    else:
        cap = min(int(candidates.numel()), int(math.floor(max_fraction * problem.n)))
        counts = _count_grid(cap, FAIRNESS_GRID_POINTS)
        with timer.phase("candidates"):
            # Σ over the top-c rows for each grid count from disjoint segments: one
            # gradient pass over the top-cap rows in all.
            sums, running, previous = [], torch.zeros_like(grad), 0
            for c in counts:
                running = running + _removal_sum(problem, candidates[previous:c])
                sums.append(running)
                previous = c
            thetas = (curvature.removal_step(problem, torch.stack(sums, dim=1), "candidates")
                      if counts else torch.empty(problem.d, 0))
            best_metric, chosen, theta = metric_before, 0, problem.theta()
            for j, c in enumerate(counts):
                value, utility = plug_in(thetas[:, j])
                ok = feasible(utility)
                curve.append({"count": c, "metric": value, utility_name: utility,
                              "feasible": ok})
                if ok and value < best_metric:
                    best_metric, chosen, theta = value, c, thetas[:, j]
                report("candidates", j + 1, len(counts))
        values["cap"] = cap

    removed = candidates[:chosen]
    metric_after, utility_after = plug_in(theta)
    values.update({
        "policy": policy,
        "n_removed": chosen,
        "fraction_removed": chosen / problem.n,
        "metric_after": metric_after,
        f"{utility_name}_after": utility_after,
        "predicted_change": float(scores[removed].sum()),
        "candidates": curve,
        "max_fraction": max_fraction,
        "max_accuracy_drop": max_accuracy_drop,
        "utility_cap": ("accuracy >= accuracy_before - max_accuracy_drop" if classifier
                        else "mse <= mse_before * (1 + max_accuracy_drop)"),
        "parameter_change_norm": float(torch.linalg.norm(theta - problem.theta())),
        "curvature": curvature.summary(),
    })
    arrays["removed"] = removed
    return _finish(values, arrays, timer, problem, curvature, problem.state_dict(theta))


# ---------------------------------------------------------------------------------
# Cross-validation


def _folds(n: int, k: int | None, folds: int | None, seed: int) -> list[np.ndarray]:
    """Disjoint folds of shuffled rows: `folds` parts of ~n/folds rows, or folds of k
    rows (all n // k of them when folds is None, else `folds` of them)."""
    order = np.random.default_rng(seed).permutation(n)
    if k is None:
        if folds is None or not isinstance(folds, int) or not 2 <= folds <= n:
            raise SpecError(f"folds must be an integer in [2, {n}], got {folds!r}")
        return [part for part in np.array_split(order, folds)]
    if not isinstance(k, int) or not 1 <= k < n:
        raise SpecError(f"k must be an integer in [1, {n - 1}], got {k!r}")
    count = n // k if folds is None else folds
    if not isinstance(count, int) or count < 1 or count * k > n:
        raise SpecError(f"{count!r} disjoint folds of {k} rows do not fit in {n} rows")
    return [order[j * k:(j + 1) * k] for j in range(count)]


def cross_validate(
    problem: Problem,
    k: int | None = None,
    folds: int | None = 5,
    seed: int = 0,
    method: str = "fisher",
    solver: str = "auto",
    solver_options: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
) -> TaskResult:
    """Approximate leave-k-out cross-validation without retraining.

    For each fold S: θ̃_{−S} = θ̂ + (1/n) C⁻¹ Σ_{i∈S} g_i (all folds in one batched
    solve; proximal form for non-smooth penalties), then the plug-in mean loss on S at
    θ̃_{−S}. estimate = mean over folds (nats). k=1 with folds=None is leave-one-out.
    values: estimate, fold_losses, in_sample_loss (loss on the folds at θ̂).
    """
    timer, report = PhaseTimer(), Progress(progress)
    parts = _folds(problem.n, k, folds, seed)
    curvature = _Curvature.build(problem, method, solver, solver_options, report)
    index = [torch.as_tensor(p, device=problem.device) for p in parts]

    with timer.phase("gradient"):
        sums = []
        for j, rows in enumerate(index):
            sums.append(_removal_sum(problem, rows))
            report("gradient", j + 1, len(index))

    with timer.phase("solve"):
        thetas = curvature.removal_step(problem, torch.stack(sums, dim=1))

    with timer.phase("evaluate"):
        fold_losses, in_sample = [], []
        losses_hat = problem.losses()
        for j, rows in enumerate(index):
            params = problem.unflatten(thetas[:, j])
            with torch.no_grad():
                ell = problem.family.loss(problem.forward(params, problem.X[rows]),
                                          problem.y[rows])
            fold_losses.append(float(ell.mean()))
            in_sample.append(float(losses_hat[rows].mean()))
            report("evaluate", j + 1, len(index))

    values = {
        "estimate": float(np.mean(fold_losses)),
        "in_sample_loss": float(np.mean(in_sample)),
        "n_folds": len(parts),
        "fold_sizes": sorted({len(p) for p in parts}),
        "seed": seed,
        "convention": "plug-in mean loss on each held-out fold at its unlearned θ",
        "curvature": curvature.summary(),
    }
    arrays = {"fold_losses": np.asarray(fold_losses), "folds": np.concatenate(parts),
              "fold_starts": np.cumsum([0] + [len(p) for p in parts])[:-1]}
    return _finish(values, arrays, timer, problem, curvature)
