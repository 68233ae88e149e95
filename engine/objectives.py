"""Objectives T(θ) that influence is measured on, written as functions of model outputs.

An `Objective` holds the rows X where the model is evaluated and a differentiable map
from the outputs f(X; θ), shape (m, K), to a scalar. The tasks evaluate f in chunks
without a graph, differentiate the map in output space, and pull that gradient back
to the parameters, so the map itself never needs the model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from engine.errors import SpecError

logger = logging.getLogger(__name__)

# Grid points per axis of the kernel density estimate behind the χ² dependence.
CHI2_GRID = 64
# Floor on the standard deviation of the predictions before they are standardized for
# the χ² estimate, so a constant predictor gives χ² = 0 instead of a division by zero.
CHI2_STD_FLOOR = 1e-8


@dataclass(frozen=True)
class Objective:
    """T(θ) = fn(f(X; θ)). X: (m, ...) inputs; fn: outputs (m, K) -> scalar tensor."""

    name: str
    X: Tensor
    fn: Callable[[Tensor], Tensor]


def family_name(family: Any) -> str:
    """The family's registry name (bernoulli, categorical, gaussian, poisson)."""
    name = getattr(family, "name", None)
    if not isinstance(name, str):
        raise SpecError(f"family object {family!r} has no name")
    return name


def predicted_mean(family: Any, outputs: Tensor) -> Tensor:
    """The scalar prediction a fairness metric looks at, shape (m,).

    bernoulli: P(y = 1) = σ(f); categorical with 2 classes: softmax(f)[:, 1];
    gaussian: f (K = 1); poisson: exp(f) (K = 1).
    """
    name = family_name(family)
    k = outputs.shape[1] if outputs.ndim == 2 else 1
    f = outputs.reshape(outputs.shape[0], -1)
    if name == "bernoulli" and k == 1:
        return torch.sigmoid(f[:, 0])
    if name == "categorical" and k == 2:
        return torch.softmax(f, dim=1)[:, 1]
    if name == "gaussian" and k == 1:
        return f[:, 0]
    if name == "poisson" and k == 1:
        return torch.exp(f[:, 0])
    raise SpecError(
        f"a scalar prediction needs bernoulli (1 output), categorical with 2 classes, "
        f"gaussian or poisson (1 output); got {name} with {k} outputs"
    )


def binary_groups(sensitive: Tensor) -> Tensor:
    """Map a two-valued sensitive attribute to {0., 1.} (larger value -> 1); (n,)."""
    values = torch.unique(sensitive)
    if values.numel() != 2:
        raise SpecError(
            f"sensitive attribute must take exactly 2 values here, found {values.numel()}"
        )
    return (sensitive == values[1]).to(torch.get_default_dtype())


def dp_gap(prob: Tensor, group: Tensor) -> Tensor:
    """Demographic parity gap |mean_{g=1} p − mean_{g=0} p|; prob, group: (n,)."""
    group = group.to(prob.dtype)
    n1 = group.sum()
    n0 = group.numel() - n1
    if n1 == 0 or n0 == 0:
        raise SpecError("demographic parity needs rows in both sensitive groups")
    return (prob @ group / n1 - prob @ (1 - group) / n0).abs()


def _kernel_on_grid(values: Tensor, bandwidth: float, grid: int) -> Tensor:
    """Gaussian kernel weights of each value at `grid` points spanning its range; (n, G)."""
    with torch.no_grad():
        low = float(values.min()) - 3 * bandwidth
        high = float(values.max()) + 3 * bandwidth
        points = torch.linspace(low, high, grid, dtype=values.dtype, device=values.device)
    return torch.exp(-0.5 * ((values[:, None] - points[None, :]) / bandwidth) ** 2)


def chi2_kde(
    prediction: Tensor, sensitive: Tensor, bandwidth: float | None = None,
    grid: int = CHI2_GRID,
) -> Tensor:
    """χ²(P_{u,s} ‖ P_u P_s) of prediction u and sensitive s from a kernel density estimate.

    Both are standardized; the joint density is a Gaussian KDE evaluated on a grid (a
    two-valued s keeps its two atoms instead of a kernel), normalized to a discrete
    distribution, and χ² = Σ P(u, s)² / (P(u) P(s)) − 1 ≥ 0, zero for independence up
    to smoothing bias. Bandwidth defaults to Scott's rule (n^{-1/5} one-dimensional,
    n^{-1/6} joint). Differentiable in `prediction`. Shapes (n,), returns a scalar.
    """
    n = prediction.numel()
    u = prediction.reshape(-1)
    u = (u - u.mean()) / u.std().clamp_min(CHI2_STD_FLOOR)

    s = sensitive.reshape(-1).to(u.dtype)
    discrete = torch.unique(s).numel() == 2
    h = bandwidth if bandwidth is not None else n ** (-1 / 5 if discrete else -1 / 6)
    if not h > 0 or not math.isfinite(h):
        raise SpecError(f"chi2 bandwidth must be positive, got {h}")

    k_u = _kernel_on_grid(u, h, grid)
    if discrete:
        k_s = torch.stack([1 - binary_groups(s), binary_groups(s)], dim=1).to(u.dtype)
    else:
        s_std = (s - s.mean()) / s.std().clamp_min(CHI2_STD_FLOOR)
        k_s = _kernel_on_grid(s_std, h, grid)

    joint = k_u.T @ k_s
    joint = joint / joint.sum()
    p_u = joint.sum(dim=1, keepdim=True)
    p_s = joint.sum(dim=0, keepdim=True)
    tiny = torch.finfo(joint.dtype).tiny
    return (joint**2 / (p_u * p_s).clamp_min(tiny)).sum() - 1


def accuracy(family: Any, outputs: Tensor, y: Tensor) -> float:
    """Fraction of rows whose most likely class equals y (bernoulli / categorical)."""
    name = family_name(family)
    f = outputs.reshape(outputs.shape[0], -1)
    if name == "bernoulli":
        predicted = (f[:, 0] > 0).to(y.dtype)
    elif name == "categorical":
        predicted = f.argmax(dim=1).to(y.dtype)
    else:
        raise SpecError(f"accuracy needs a classifier family, got {name}")
    return float((predicted == y.reshape(-1)).to(torch.float64).mean())


def mean_squared_error(family: Any, outputs: Tensor, y: Tensor) -> float:
    """Mean squared error of the predicted mean against y (regression families)."""
    prediction = predicted_mean(family, outputs)
    return float(((prediction - y.reshape(-1).to(prediction.dtype)) ** 2).mean())


def is_classifier(family: Any) -> bool:
    """True for bernoulli and categorical."""
    return family_name(family) in ("bernoulli", "categorical")


def mean_loss(family: Any, X: Tensor, y: Tensor, name: str = "mean_loss") -> Objective:
    """T(θ) = (1/m) Σ_j ℓ(x_j, y_j; θ): the mean loss (nats) over the rows X, y."""
    if X.shape[0] != y.shape[0] or X.shape[0] == 0:
        raise SpecError(f"{name}: X has {X.shape[0]} rows and y {y.shape[0]}")
    return Objective(name, X, lambda outputs: family.loss(outputs, y).mean())


def demographic_parity(family: Any, X: Tensor, sensitive: Tensor) -> Objective:
    """T(θ) = |mean_{s=1} p̂ − mean_{s=0} p̂| on the rows X, p̂ the positive-class
    probability (bernoulli, or categorical with 2 classes); s has two values."""
    if family_name(family) not in ("bernoulli", "categorical"):
        raise SpecError("demographic_parity needs a binary classifier "
                        f"(bernoulli or 2-class categorical), got {family_name(family)}")
    group = binary_groups(sensitive.reshape(-1))
    return Objective("demographic_parity", X,
                     lambda outputs: dp_gap(predicted_mean(family, outputs), group))


def chi2_dependence(
    family: Any, X: Tensor, sensitive: Tensor, bandwidth: float | None = None
) -> Objective:
    """T(θ) = KDE χ² between the predicted mean on X and the sensitive attribute
    (binary or continuous); see `chi2_kde`."""
    s = sensitive.reshape(-1)
    if torch.unique(s).numel() < 2:
        raise SpecError("chi2 needs a sensitive attribute with at least 2 distinct values")
    return Objective("chi2", X,
                     lambda outputs: chi2_kde(predicted_mean(family, outputs), s, bandwidth))


def make_fairness_objective(
    metric: str, family: Any, X: Tensor, sensitive: Tensor
) -> Objective:
    """demographic_parity | chi2 on the rows X (raises SpecError naming bad input)."""
    if sensitive.reshape(-1).shape[0] != X.shape[0]:
        raise SpecError(
            f"sensitive has {sensitive.reshape(-1).shape[0]} values for {X.shape[0]} rows"
        )
    if not torch.isfinite(sensitive).all():
        raise SpecError("sensitive contains NaN or infinite values")
    if metric == "demographic_parity":
        return demographic_parity(family, X, sensitive)
    if metric == "chi2":
        return chi2_dependence(family, X, sensitive)
    raise SpecError(f"metric must be demographic_parity or chi2, got {metric!r}")
