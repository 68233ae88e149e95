"""Training to a tight optimum of L(θ; w) = (1/n) Σ_i w_i ℓ_i + λπ(θ).

Smooth penalties: full-batch L-BFGS with a strong-Wolfe line search. Non-smooth ones
(l1, elastic net, group lasso): FISTA with backtracking and restarts. Small models are
trained in float64 (a copy), and the result is cast back. Used to train θ̂ and to
retrain exactly after removing rows (w_i = 0, the 1/n kept).
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
from engine.problem import Problem

logger = logging.getLogger(__name__)

FLOAT64_MAX_D = 200_000  # train a float64 copy when the scope has at most this many values
FIT_TOL = 1e-9  # L-BFGS: stop when max |∇L| <= tol; FISTA: gradient-mapping norm <= tol
FIT_MAX_ITER = 2000
FLOAT32_TOL = 1e-6  # tolerance floor when a large model trains in float32


@dataclass
class FitReport:
    """How training went: `gradient_norm` is ‖∇L‖₂ (smooth) or the proximal gradient
    mapping norm (non-smooth) at the returned θ; `wall_time` in seconds."""

    method: str
    iterations: int
    objective: float
    gradient_norm: float
    converged: bool
    wall_time: float
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _weights(problem: Problem, weights: Tensor | Any | None) -> Tensor | None:
    if weights is None:
        return None
    w = torch.as_tensor(weights).detach()
    if w.shape != (problem.n,):
        raise SpecError(f"weights must have shape ({problem.n},), got {list(w.shape)}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise SpecError("weights must be finite and >= 0")
    return w.to(problem.device, problem.dtype)


def _value_and_grad(problem: Problem, theta: Tensor, w: Tensor | None, smooth_penalty: bool
                    ) -> tuple[Tensor, Tensor]:
    """Objective (data + smooth penalty, or data only) and its gradient at flat θ."""
    theta = theta.detach().requires_grad_(True)
    with torch.enable_grad():
        params = problem.unflatten(theta)
        if smooth_penalty:
            value = problem.objective(params, w)
        else:
            value = problem.objective(params, w) - problem.regularizer.value(params)
        (grad,) = torch.autograd.grad(value, theta)
    return value.detach(), grad.detach()


def fit(
    problem: Problem,
    weights: Tensor | Any | None = None,
    max_iter: int = FIT_MAX_ITER,
    tol: float = FIT_TOL,
    float64: bool | None = None,
    adam_steps: int = 0,
    adam_lr: float = 1e-3,
    seed: int = 0,
) -> tuple[dict[str, Tensor], FitReport]:
    """Minimize L(θ; w) from the problem's current θ; the problem itself is not changed.

    Returns the full state dict (CPU, the problem's dtype) and a `FitReport`.
    `adam_steps` > 0 first runs minibatch Adam (useful for MLPs from a random start).
    """
    start = time.perf_counter()
    if float64 is None:
        float64 = problem.d <= FLOAT64_MAX_D
    work = problem.clone(torch.float64) if float64 and problem.dtype != torch.float64 \
        else problem.clone()
    w = _weights(work, weights)
    theta = work.theta().clone()
    if work.dtype != torch.float64:
        # Gradients of a float32 objective carry ~1e-7 relative noise; ask for no less.
        tol = max(tol, FLOAT32_TOL)

    if adam_steps > 0:
        theta = _adam(work, theta, w, adam_steps, adam_lr, seed)
    if work.regularizer.smooth:
        theta, report = _lbfgs(work, theta, w, max_iter, tol)
    else:
        theta, report = _fista(work, theta, w, max_iter, tol)
    report.wall_time = time.perf_counter() - start
    report.dtype = str(work.dtype).replace("torch.", "")
    logger.info("fit %s: %d iterations, objective %.6g, gradient norm %.3g, %.2fs",
                report.method, report.iterations, report.objective, report.gradient_norm,
                report.wall_time)
    return problem.state_dict(theta.to(problem.device, problem.dtype)), report


def _adam(problem: Problem, theta: Tensor, w: Tensor | None, steps: int, lr: float,
          seed: int) -> Tensor:
    theta = theta.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    size = min(problem.batch_size, problem.n)
    for _ in range(steps):
        idx = torch.randperm(problem.n, generator=gen)[:size].to(problem.device)
        with torch.enable_grad():
            params = problem.unflatten(theta)
            ell = problem.family.loss(problem.forward(params, problem.X[idx]), problem.y[idx])
            if w is not None:
                ell = ell * w[idx]
            # Smooth part of the penalty only; the prox methods handle the rest later.
            c = problem.regularizer.l2_coefficient
            penalty = sum(0.5 * c * (p * p).sum() for n, p in params.items()
                          if problem.regularizer.penalized(n))
            loss = ell.mean() + penalty
        opt.zero_grad()
        loss.backward()
        opt.step()
    return theta.detach()


def _lbfgs(problem: Problem, theta: Tensor, w: Tensor | None, max_iter: int, tol: float
           ) -> tuple[Tensor, FitReport]:
    x = theta.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=max_iter, max_eval=int(max_iter * 1.5),
                            tolerance_grad=tol, tolerance_change=1e-30, history_size=50,
                            line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        value, grad = _value_and_grad(problem, x, w, smooth_penalty=True)
        x.grad = grad
        return value

    # L-BFGS may stop early on a flat line search; restart it (fresh history) a few times.
    iterations = 0
    for _ in range(5):
        opt.step(closure)
        iterations += int(opt.state[opt._params[0]]["n_iter"])
        _, grad = _value_and_grad(problem, x, w, smooth_penalty=True)
        if float(grad.abs().max()) <= tol or iterations >= max_iter:
            break
        opt.state.clear()
    value, grad = _value_and_grad(problem, x, w, smooth_penalty=True)
    norm = float(torch.linalg.norm(grad))
    report = FitReport(method="lbfgs", iterations=iterations, objective=float(value),
                       gradient_norm=norm, converged=float(grad.abs().max()) <= tol * 10,
                       wall_time=0.0, dtype="")
    return x.detach(), report


def _fista(problem: Problem, theta: Tensor, w: Tensor | None, max_iter: int, tol: float
           ) -> tuple[Tensor, FitReport]:
    """FISTA with backtracking on the data term (smooth) + prox of the whole penalty."""
    L = 1.0
    x = problem.reg_prox(theta, 0.0)
    y, x_prev, t = x.clone(), x.clone(), 1.0
    mapping = math.inf
    it = 0
    while it < max_iter:
        it += 1
        fy, gy = _value_and_grad(problem, y, w, smooth_penalty=False)
        while True:
            x = problem.reg_prox(y - gy / L, 1.0 / L)
            with torch.no_grad():
                fx = problem.objective(problem.unflatten(x), w) - problem.reg_value(x)
            step = x - y
            if float(fx) <= float(fy) + float(gy @ step) + 0.5 * L * float(step @ step) + 1e-15:
                break
            L *= 2.0
        mapping = L * float(torch.linalg.norm(step))
        if mapping <= tol:
            break

        if float((y - x) @ (x - x_prev)) > 0:  # momentum uphill: restart
            t, y = 1.0, x.clone()
        else:
            t_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
            y = x + ((t - 1.0) / t_next) * (x - x_prev)
            t = t_next
        x_prev = x
        L *= 0.9  # let the step grow back after backtracking

    fx, _ = _value_and_grad(problem, x, w, smooth_penalty=False)
    report = FitReport(method="fista", iterations=it,
                       objective=float(fx) + float(problem.reg_value(x)),
                       gradient_norm=mapping, converged=mapping <= tol * 10, wall_time=0.0,
                       dtype="")
    return x, report
