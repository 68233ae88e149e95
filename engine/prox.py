"""Proximal step in the Fisher metric, for non-smooth penalties (l1, group lasso, ...).

    θ̃ = argmin_θ ½ (θ − v)ᵀ F (θ − v) + λπ(θ)

solved by FISTA: step 1/L with L ≥ λ_max(F) (power iteration, times a margin), one F
product and one Euclidean prox of λπ per iteration, with gradient-based restarts. F
should be the data Fisher WITHOUT the penalty's curvature (the whole penalty, smooth
part included, is handled by its prox).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from engine.errors import SpecError
from engine.operators import LinearOperator, fisher_operator, power_iteration
from engine.problem import Problem

logger = logging.getLogger(__name__)

PROX_TOL = 1e-8  # stop when ‖θ_k − θ_{k−1}‖ <= tol·(1 + ‖θ_k‖)
PROX_MAX_ITER = 2000
LIPSCHITZ_MARGIN = 1.1  # power iteration estimates λ_max from below


@dataclass
class ProxReport:
    """Iterations, final relative step, L used, objective value, wall time (s)."""

    iterations: int
    converged: bool
    relative_step: float
    lipschitz: float
    objective: float
    restarts: int
    wall_time: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fisher_prox(
    problem: Problem,
    v: Tensor,
    op: LinearOperator | None = None,
    x0: Tensor | None = None,
    tol: float = PROX_TOL,
    max_iter: int = PROX_MAX_ITER,
    lipschitz: float | None = None,
) -> tuple[Tensor, ProxReport]:
    """argmin_θ ½(θ − v)ᵀF(θ − v) + λπ(θ) over the in-scope parameters; θ, v flat (d,).

    `op` defaults to the problem's unregularized full-data Fisher; `x0` (default v) is the
    starting point, e.g. θ̂ for a warm start.
    """
    start = time.perf_counter()
    if v.dim() != 1 or v.shape[0] != problem.d:
        raise SpecError(f"fisher_prox: v must have shape ({problem.d},), got {list(v.shape)}")
    op = op if op is not None else fisher_operator(problem, regularized=False)
    v = v.to(problem.device, problem.dtype)
    if lipschitz is None:
        lipschitz = LIPSCHITZ_MARGIN * power_iteration(op, iters=100, tol=1e-4)
    L = max(float(lipschitz), 1e-12)

    x = (v if x0 is None else x0.to(v)).clone()
    x_prev = x.clone()
    y = x.clone()
    t = 1.0
    restarts, rel, it = 0, math.inf, 0
    while it < max_iter:
        it += 1
        grad = op.matvec(y - v)
        x = problem.reg_prox(y - grad / L, 1.0 / L)
        rel = float(torch.linalg.norm(x - x_prev)) / (1.0 + float(torch.linalg.norm(x)))
        if rel <= tol:
            break

        # Restart the momentum when it points uphill (O'Donoghue & Candès' gradient test).
        if float((y - x) @ (x - x_prev)) > 0:
            t, restarts = 1.0, restarts + 1
            y = x.clone()
        else:
            t_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
            y = x + ((t - 1.0) / t_next) * (x - x_prev)
            t = t_next
        x_prev = x

    diff = x - v
    objective = 0.5 * float(diff @ op.matvec(diff)) + float(problem.reg_value(x))
    report = ProxReport(iterations=it, converged=rel <= tol, relative_step=rel, lipschitz=L,
                        objective=objective, restarts=restarts,
                        wall_time=time.perf_counter() - start)
    if not report.converged:
        logger.warning("fisher_prox: not converged after %d iterations (step %.3g)", it, rel)
    return x, report
