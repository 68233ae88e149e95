"""Independent oracles for the engine's tasks: dense numpy algebra and tight solvers.

Nothing here imports `engine`. Linear models are written out in numpy (gradients,
Hessians, Newton iterations, coordinate descent); the tiny MLP is written out by hand
in float64 torch and solved with dense Newton steps, so the oracles share no code with
the engine's operators, solvers or training loop.

Conventions: weighted objective L(θ; w) = (1/n) Σ_i w_i ℓ_i(θ) + λ π(θ) with n fixed
(removal sets w_i = 0 and keeps the 1/n). Linear-model parameters are θ = (w, b): the
coefficients followed by the intercept; `penalize_bias` says whether π includes b.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import minimize

# ---------------------------------------------------------------------------------
# Linear models in numpy


def _design(X: np.ndarray) -> np.ndarray:
    """X with a trailing column of ones (for the intercept); (n, d + 1)."""
    return np.hstack([X, np.ones((X.shape[0], 1))])


def _penalty_mask(d: int, penalize_bias: bool) -> np.ndarray:
    mask = np.ones(d + 1)
    if not penalize_bias:
        mask[-1] = 0.0
    return mask


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def logistic_per_sample(X: np.ndarray, y: np.ndarray, theta: np.ndarray):
    """Per-sample losses (n,), gradients (n, d+1) and curvatures σ(1−σ) (n,)."""
    A = _design(X)
    z = A @ theta
    p = _sigmoid(z)
    losses = np.logaddexp(0.0, z) - y * z
    return losses, (p - y)[:, None] * A, p * (1 - p)


def logistic_objective(X, y, theta, lam, weights=None, penalize_bias=True):
    """L(θ; w), its gradient and Hessian for L2 logistic regression."""
    n, d = X.shape
    w = np.ones(n) if weights is None else weights
    mask = _penalty_mask(d, penalize_bias)
    A = _design(X)
    losses, grads, curv = logistic_per_sample(X, y, theta)
    value = w @ losses / n + 0.5 * lam * np.sum(mask * theta**2)
    grad = grads.T @ w / n + lam * mask * theta
    hess = (A * (w * curv)[:, None]).T @ A / n + lam * np.diag(mask)
    return value, grad, hess


def fit_logistic(X, y, lam, weights=None, penalize_bias=True, theta0=None, tol=1e-12):
    """Minimizer of the weighted L2 logistic objective by damped Newton; (d + 1,).

    Stops when the Newton step is below tol relative to ‖θ‖ (quadratic convergence
    makes the result exact to rounding)."""
    theta = np.zeros(X.shape[1] + 1) if theta0 is None else theta0.copy()
    for _ in range(100):
        value, grad, hess = logistic_objective(X, y, theta, lam, weights, penalize_bias)
        step = np.linalg.solve(hess, grad)
        if np.linalg.norm(step) <= tol * max(1.0, np.linalg.norm(theta)):
            return theta - step
        # Backtrack only far from the optimum: near it, rounding hides the decrease.
        t = 1.0
        while grad @ step > 1e-12 and t > 1e-8 and \
                logistic_objective(X, y, theta - t * step, lam, weights, penalize_bias)[0] > \
                value - 0.25 * t * grad @ step:
            t *= 0.5
        theta = theta - t * step
    raise RuntimeError("oracle Newton did not converge")


def logistic_loss_mean(X, y, theta) -> float:
    """Mean logistic loss (nats) of rows X, y at θ."""
    return float(logistic_per_sample(X, y, theta)[0].mean())


def fit_ridge(X, y, lam, weights=None, penalize_bias=True, loss_scale=0.5):
    """Closed-form minimizer of (1/n) Σ w_i c (x̃_i θ − y_i)² + (λ/2) ‖θ‖², c = loss_scale."""
    n, d = X.shape
    w = np.ones(n) if weights is None else weights
    A = _design(X)
    penalty = lam * np.diag(_penalty_mask(d, penalize_bias))
    lhs = 2 * loss_scale * (A * w[:, None]).T @ A / n + penalty
    rhs = 2 * loss_scale * (A * w[:, None]).T @ y / n
    return np.linalg.solve(lhs, rhs)


def ridge_grads_hessian(X, y, theta, lam, penalize_bias=True, loss_scale=0.5):
    """Per-sample gradients (n, d+1) and the full Hessian of the unweighted objective."""
    n, d = X.shape
    A = _design(X)
    residual = A @ theta - y
    grads = 2 * loss_scale * residual[:, None] * A
    hess = 2 * loss_scale * A.T @ A / n + lam * np.diag(_penalty_mask(d, penalize_bias))
    return grads, hess


def newton_removal_step(theta_hat, grads, hess, remove) -> np.ndarray:
    """θ̂ + (1/n) H⁻¹ Σ_{i∈S} g_i: one dense Newton step of the weighted objective."""
    n = grads.shape[0]
    return theta_hat + np.linalg.solve(hess, grads[remove].sum(axis=0)) / n


# ---------------------------------------------------------------------------------
# L1-regularized logistic regression


def soft_threshold(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.maximum(np.abs(x) - t, 0.0)


def quadratic_l1(Q, v, lam_vec, x0=None, sweeps=5000, tol=1e-14):
    """argmin_x ½ (x − v)ᵀ Q (x − v) + Σ_j lam_vec_j |x_j| by cyclic coordinate descent."""
    x = v.copy() if x0 is None else x0.copy()
    diag = np.diag(Q)
    for _ in range(sweeps):
        biggest = 0.0
        for j in range(len(x)):
            # Partial residual without coordinate j.
            r = Q[j] @ (x - v) - diag[j] * (x[j] - v[j])
            center = v[j] - r / diag[j]
            new = np.sign(center) * max(abs(center) - lam_vec[j] / diag[j], 0.0)
            biggest = max(biggest, abs(new - x[j]))
            x[j] = new
        if biggest < tol:
            break
    return x


def fit_logistic_l1(X, y, lam, weights=None, penalize_bias=False, theta0=None, tol=1e-12,
                    l1_ratio=1.0):
    """Minimizer of (1/n) Σ w_i ℓ_i + λ (α‖w‖₁ + (1 − α)½‖w‖²), α = l1_ratio (intercept
    unpenalized by default) by proximal Newton with backtracking; (d + 1,)."""
    n, d = X.shape
    mask = _penalty_mask(d, penalize_bias)
    lam_vec = lam * l1_ratio * mask
    ridge = lam * (1.0 - l1_ratio)
    theta = np.zeros(d + 1) if theta0 is None else theta0.copy()

    def smooth(t):
        value, grad, hess = logistic_objective(X, y, t, 0.0, weights)
        return (value + 0.5 * ridge * np.sum(mask * t**2), grad + ridge * mask * t,
                hess + ridge * np.diag(mask))

    def value(t):
        return smooth(t)[0] + np.sum(lam_vec * np.abs(t))

    for _ in range(200):
        _, grad, hess = smooth(theta)
        target = theta - np.linalg.solve(hess, grad)
        proposal = quadratic_l1(hess, target, lam_vec, x0=theta)
        step = proposal - theta
        if np.max(np.abs(step)) < tol:
            return proposal
        t, current = 1.0, value(theta)
        while value(theta + t * step) > current and t > 1e-10:
            t *= 0.5
        theta = theta + t * step
    raise RuntimeError("oracle proximal Newton did not converge")


def prox_newton_removal(X, y, theta_hat, lam, remove, penalize_bias=False):
    """The F-metric proximal step of AFIF for L1 logistic regression, in numpy.

    v = θ̂ − F⁻¹ b_w with b_w the weighted data gradient, then argmin ½‖θ − v‖²_F + λ‖θ‖₁.
    """
    n, d = X.shape
    weights = np.ones(n)
    weights[remove] = 0.0
    _, grad, fisher = logistic_objective(X, y, theta_hat, 0.0, weights=None)
    _, grad_w, _ = logistic_objective(X, y, theta_hat, 0.0, weights=weights)
    v = theta_hat - np.linalg.solve(fisher, grad_w)
    return quadratic_l1(fisher, v, lam * _penalty_mask(d, penalize_bias), x0=theta_hat)


# ---------------------------------------------------------------------------------
# Tiny MLP written out by hand (float64 torch), dense Newton solves


class TinyMLP:
    """f(x) = W2 act(W1 x + b1) + b2 with one output, bernoulli (BCE with logits) loss.

    Parameters travel as one flat float64 vector in the order W1 (h, d), b1 (h,),
    W2 (1, h), b2 (1,), matching a torch Sequential(Linear, act, Linear) state dict
    read in order. Objective: (1/n) Σ w_i ℓ_i + (λ/2) ‖θ‖².
    """

    def __init__(self, X: np.ndarray, y: np.ndarray, hidden: int, lam: float,
                 activation: str = "tanh") -> None:
        self.X = torch.as_tensor(X, dtype=torch.float64)
        self.y = torch.as_tensor(y, dtype=torch.float64)
        self.n, self.d = X.shape
        self.hidden = hidden
        self.lam = lam
        self.act: Callable[[torch.Tensor], torch.Tensor] = {
            "tanh": torch.tanh, "selu": torch.selu}[activation]
        self.shapes = [(hidden, self.d), (hidden,), (1, hidden), (1,)]
        self.size = sum(int(np.prod(s)) for s in self.shapes)

    def unpack(self, theta: torch.Tensor) -> list[torch.Tensor]:
        parts, start = [], 0
        for shape in self.shapes:
            count = int(np.prod(shape))
            parts.append(theta[start:start + count].reshape(shape))
            start += count
        return parts

    def outputs(self, theta: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        W1, b1, W2, b2 = self.unpack(theta)
        return (self.act(X @ W1.T + b1) @ W2.T + b2)[:, 0]

    @staticmethod
    def bce(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(f) - y * f

    def losses(self, theta: torch.Tensor, X=None, y=None) -> torch.Tensor:
        X = self.X if X is None else X
        y = self.y if y is None else y
        return self.bce(self.outputs(theta, X), y)

    def objective(self, theta: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return weights @ self.losses(theta) / self.n + 0.5 * self.lam * theta @ theta

    def fit(self, seed: int = 0, weights: np.ndarray | None = None) -> np.ndarray:
        """Train from a small random start: scipy L-BFGS, then Newton polish."""
        rng = np.random.default_rng(seed)
        theta0 = rng.normal(scale=0.3, size=self.size)
        w = self._weights(weights)

        def fun(t):
            t = torch.tensor(t, requires_grad=True)
            value = self.objective(t, w)
            (grad,) = torch.autograd.grad(value, t)
            return float(value.detach()), grad.numpy()

        res = minimize(fun, theta0, jac=True, method="L-BFGS-B",
                       options={"maxiter": 20000, "gtol": 1e-7, "ftol": 0.0})
        return self.newton(lambda t: self.objective(t, w), res.x)

    def _weights(self, weights: np.ndarray | None) -> torch.Tensor:
        if weights is None:
            return torch.ones(self.n, dtype=torch.float64)
        return torch.as_tensor(weights, dtype=torch.float64)

    @staticmethod
    def newton(fn: Callable[[torch.Tensor], torch.Tensor], theta0: np.ndarray,
               tol: float = 1e-12, max_iter: int = 100) -> np.ndarray:
        """Damped Newton with dense Hessians (Levenberg shift when not positive)."""
        theta = torch.as_tensor(theta0, dtype=torch.float64).clone()
        for _ in range(max_iter):
            t = theta.clone().requires_grad_(True)
            value = fn(t)
            (grad,) = torch.autograd.grad(value, t)
            if float(grad.norm()) < tol:
                return theta.numpy()
            hess = torch.autograd.functional.hessian(fn, theta, vectorize=True)
            shift = 0.0
            while True:
                try:
                    chol = torch.linalg.cholesky(hess + shift * torch.eye(len(theta),
                                                                          dtype=hess.dtype))
                    break
                except RuntimeError:
                    shift = max(2 * shift, 1e-8)
            step = torch.cholesky_solve(grad[:, None], chol)[:, 0]
            t_len = 1.0
            slope, value = float(grad @ step), value.detach()
            # Backtrack only far from the optimum: near it, rounding hides the decrease.
            while slope > 1e-12 and t_len > 1e-10 and \
                    float(fn(theta - t_len * step).detach()) > float(value) - 1e-4 * t_len * slope:
                t_len *= 0.5
            theta = theta - t_len * step
            if t_len == 1.0 and float(step.norm()) <= 1e-13 * max(1.0, float(theta.norm())):
                return theta.numpy()
        raise RuntimeError(f"oracle Newton did not converge, gradient norm {float(grad.norm())}")

    @staticmethod
    def chord_newton(fn: Callable[[torch.Tensor], torch.Tensor], theta0: np.ndarray,
                     hess: torch.Tensor, tol: float = 1e-13, max_iter: int = 60) -> np.ndarray:
        """Minimize fn from θ0 by steps −H0⁻¹∇fn with a fixed Hessian H0 near the answer.

        Converges linearly at rate ‖I − H0⁻¹H*‖ (about |S|/n for a few removed rows), so
        a few dozen cheap gradient steps reach rounding; stops on a gradient below tol
        or a relative step below 1e-14, else raises.
        """
        chol = torch.linalg.cholesky(hess)
        theta = torch.as_tensor(theta0, dtype=torch.float64).clone()
        for _ in range(max_iter):
            t = theta.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(fn(t), t)
            if float(grad.norm()) < tol:
                return theta.numpy()
            step = torch.cholesky_solve(grad[:, None], chol)[:, 0]
            theta = theta - step
            if float(step.norm()) <= 1e-14 * max(1.0, float(theta.norm())):
                return theta.numpy()
        raise RuntimeError(f"oracle chord Newton did not converge, gradient {float(grad.norm())}")

    def hessian(self, fn: Callable[[torch.Tensor], torch.Tensor], theta: np.ndarray
                ) -> torch.Tensor:
        """Dense Hessian of fn at θ, (d, d)."""
        return torch.autograd.functional.hessian(
            fn, torch.as_tensor(theta, dtype=torch.float64), vectorize=True)

    def retrain_without(self, theta_hat: np.ndarray, remove,
                        hess: torch.Tensor | None = None) -> np.ndarray:
        """Warm-started exact minimizer of the weighted objective with w_S = 0. `hess`:
        the Hessian of the full objective at θ̂, reused across calls (chord Newton)."""
        w = torch.ones(self.n, dtype=torch.float64)
        w[torch.as_tensor(np.atleast_1d(remove))] = 0.0

        def fn(t: torch.Tensor) -> torch.Tensor:
            return self.objective(t, w)

        return self._solve(fn, theta_hat, hess, remove)

    def _solve(self, fn: Callable[[torch.Tensor], torch.Tensor], theta_hat: np.ndarray,
               hess: torch.Tensor | None, remove) -> np.ndarray:
        """Chord Newton with the Hessian at θ̂ less the removed rows' share (or, failing
        that, the full Hessian); rows that move θ too far for either fall back to damped
        Newton with fresh Hessians. Every path stops only at a vanishing gradient."""
        if hess is not None:
            for preconditioner in (hess - self._row_hessian(theta_hat, remove), hess):
                try:
                    return self.chord_newton(fn, theta_hat, preconditioner)
                except RuntimeError:
                    continue
        return self.newton(fn, theta_hat)

    def _row_hessian(self, theta: np.ndarray, rows) -> torch.Tensor:
        """(1/n) Σ_{i∈rows} ∇²ℓ_i at θ: what removing the rows takes off the Hessian."""
        idx = torch.as_tensor(np.atleast_1d(rows))

        def fn(t: torch.Tensor) -> torch.Tensor:
            return self.bce(self.outputs(t, self.X[idx]), self.y[idx]).sum() / self.n

        return self.hessian(fn, theta)

    def pbrf_objective(self, theta_hat: np.ndarray, remove: int | None, damping: float
                       ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The proximal Bregman objective of removing one row (Bae et al., 2022):

        (1/n) Σ_j D_j(θ) − (1/n) ℓ_remove(θ) + ((λ + δ)/2) ‖θ − θ̂‖², where
        D_j(θ) = ℓ(f_j(θ)) − ℓ(f̂_j) − ℓ'(f̂_j)(f_j(θ) − f̂_j) is the Bregman divergence
        of the output-space loss around θ̂'s outputs. For the L2 penalty, its own
        Bregman divergence is (λ/2)‖θ − θ̂‖², so λ joins the damping δ. remove=None
        drops the removal term (its Hessian at θ̂ preconditions every row's solve).
        """
        base = torch.as_tensor(theta_hat, dtype=torch.float64)
        f_hat = self.outputs(base, self.X).detach()
        loss_hat = self.bce(f_hat, self.y)
        dloss_hat = torch.sigmoid(f_hat) - self.y

        def fn(t: torch.Tensor) -> torch.Tensor:
            f = self.outputs(t, self.X)
            bregman = self.bce(f, self.y) - loss_hat - dloss_hat * (f - f_hat)
            prox = 0.5 * (self.lam + damping) * torch.sum((t - base) ** 2)
            value = bregman.sum() / self.n + prox
            if remove is not None:
                value = value - self.bce(f[remove], self.y[remove]) / self.n
            return value

        return fn

    def pbrf(self, theta_hat: np.ndarray, remove: int, damping: float,
             hess: torch.Tensor | None = None) -> np.ndarray:
        """Minimizer of `pbrf_objective`; `hess` as from pbrf_objective(remove=None)."""
        fn = self.pbrf_objective(theta_hat, remove, damping)
        return self._solve(fn, theta_hat, hess, remove)

    def mean_loss(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
        t = torch.as_tensor(theta, dtype=torch.float64)
        return float(self.losses(t, torch.as_tensor(X, dtype=torch.float64),
                                 torch.as_tensor(y, dtype=torch.float64)).mean())

    def state_dict(self, theta: np.ndarray) -> dict[str, torch.Tensor]:
        """Torch state dict of Sequential(Linear, act, Linear) holding θ."""
        W1, b1, W2, b2 = self.unpack(torch.as_tensor(theta, dtype=torch.float64))
        return {"0.weight": W1.clone(), "0.bias": b1.clone(),
                "2.weight": W2.clone(), "2.bias": b2.clone()}


# ---------------------------------------------------------------------------------
# Cross-validation and leave-one-out by retraining


def exact_logistic_cv(X, y, lam, folds, penalize_bias=True) -> float:
    """Mean over folds of the mean loss on the fold at the retrained weighted model."""
    theta_hat = fit_logistic(X, y, lam, penalize_bias=penalize_bias)
    losses = []
    for fold in folds:
        weights = np.ones(len(y))
        weights[fold] = 0.0
        theta = fit_logistic(X, y, lam, weights, penalize_bias, theta0=theta_hat)
        losses.append(logistic_loss_mean(X[fold], y[fold], theta))
    return float(np.mean(losses))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (no ties expected)."""
    ra = np.argsort(np.argsort(a))
    rb = np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])
