"""Exponential-family losses on natural parameters f (the model outputs).

Shapes: f is (n, K); labels y are (n,) (or (n, K) for multi-output gaussian).
loss(f, y) is per row, (n,), in nats. curvature(f, u) = Λ(f) u for u shaped like f,
with Λ(f) = ∇²_f loss, which does not depend on y. Losses are written out by hand so
forward-mode AD composes with them (``F.mse_loss`` breaks ``jvp(grad(.))`` on torch 2.13).

Scale of the gaussian family: loss = ½‖f − y‖², i.e. unit noise variance s² = 1 and Λ = I.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.errors import SpecError

logger = logging.getLogger(__name__)


def _as_2d(f: Tensor) -> Tensor:
    return f.unsqueeze(-1) if f.dim() == 1 else f


@dataclass(frozen=True)
class Family:
    """Base class; subclasses set `name` and implement the methods below."""

    name: str = "family"

    def loss(self, f: Tensor, y: Tensor) -> Tensor:
        """Per-row negative log-likelihood (up to a y-only constant), shape (n,)."""
        raise NotImplementedError

    def grad_f(self, f: Tensor, y: Tensor) -> Tensor:
        """∇_f loss, shape of f (n, K)."""
        raise NotImplementedError

    def curvature(self, f: Tensor, u: Tensor) -> Tensor:
        """Λ(f) u, u of the shape of f (n, K); no K×K matrix is formed."""
        raise NotImplementedError

    def predict(self, f: Tensor) -> Tensor:
        """Mean of y given f: class probabilities (n, K), P(y=1) (n,), or the mean (n,)."""
        raise NotImplementedError

    def check_labels(self, y: Tensor, out_dim: int) -> Tensor:
        """Validate labels against the model's output size; return them in canonical dtype.

        Raises `SpecError` naming the problem (e.g. "labels must be 0/1 for bernoulli").
        """
        raise NotImplementedError


def _check_rows(y: Tensor, name: str) -> None:
    if y.dim() != 1:
        raise SpecError(f"labels for {name} must be a 1-d array, got shape {list(y.shape)}")
    if y.is_floating_point() and not bool(torch.isfinite(y).all()):
        raise SpecError(f"labels for {name} contain NaN or inf")


def _is_integral(y: Tensor) -> bool:
    return not y.is_floating_point() or bool((y == torch.round(y)).all())


@dataclass(frozen=True)
class Categorical(Family):
    """Softmax cross-entropy, K ≥ 2 outputs, labels int 0..K-1; Λ = diag(p) − p pᵀ."""

    name: str = "categorical"

    def loss(self, f: Tensor, y: Tensor) -> Tensor:
        logp = f - torch.logsumexp(f, dim=-1, keepdim=True)
        return -logp.gather(-1, y.long().unsqueeze(-1)).squeeze(-1)

    def grad_f(self, f: Tensor, y: Tensor) -> Tensor:
        return torch.softmax(f, dim=-1) - F.one_hot(y.long(), f.shape[-1]).to(f.dtype)

    def curvature(self, f: Tensor, u: Tensor) -> Tensor:
        p = torch.softmax(f, dim=-1)
        pu = p * u
        return pu - p * pu.sum(dim=-1, keepdim=True)

    def predict(self, f: Tensor) -> Tensor:
        return torch.softmax(f, dim=-1)

    def check_labels(self, y: Tensor, out_dim: int) -> Tensor:
        _check_rows(y, self.name)
        if out_dim < 2:
            raise SpecError(f"categorical needs a model with at least 2 outputs, has {out_dim}")
        if not _is_integral(y) or (y.numel() and (y.min() < 0 or y.max() >= out_dim)):
            raise SpecError(f"labels must be integers 0..{out_dim - 1} for categorical "
                            f"with {out_dim} outputs")
        return y.long()


@dataclass(frozen=True)
class Bernoulli(Family):
    """Binary cross-entropy with logits, 1 output, labels 0/1; Λ = σ(f)(1 − σ(f))."""

    name: str = "bernoulli"

    def loss(self, f: Tensor, y: Tensor) -> Tensor:
        f = _as_2d(f)[..., 0]
        # softplus(f) - y f is the stable form of -y log σ(f) - (1-y) log(1-σ(f)).
        return F.softplus(f) - y.to(f.dtype) * f

    def grad_f(self, f: Tensor, y: Tensor) -> Tensor:
        return torch.sigmoid(f) - _as_2d(y.to(f.dtype))

    def curvature(self, f: Tensor, u: Tensor) -> Tensor:
        p = torch.sigmoid(f)
        return p * (1 - p) * u

    def predict(self, f: Tensor) -> Tensor:
        return torch.sigmoid(_as_2d(f)[..., 0])

    def check_labels(self, y: Tensor, out_dim: int) -> Tensor:
        _check_rows(y, self.name)
        if out_dim != 1:
            raise SpecError(f"bernoulli needs a model with 1 output, has {out_dim}")
        if not bool(((y == 0) | (y == 1)).all()):
            raise SpecError("labels must be 0/1 for bernoulli")
        return y.to(torch.get_default_dtype())


@dataclass(frozen=True)
class Gaussian(Family):
    """Squared error ½‖f − y‖² (unit variance, s² = 1), any K; Λ = I."""

    name: str = "gaussian"

    def loss(self, f: Tensor, y: Tensor) -> Tensor:
        r = _as_2d(f) - _as_2d(y).to(f.dtype)
        return 0.5 * (r * r).sum(dim=-1)

    def grad_f(self, f: Tensor, y: Tensor) -> Tensor:
        return _as_2d(f) - _as_2d(y).to(f.dtype)

    def curvature(self, f: Tensor, u: Tensor) -> Tensor:
        return u

    def predict(self, f: Tensor) -> Tensor:
        return f[..., 0] if f.dim() == 2 and f.shape[-1] == 1 else f

    def check_labels(self, y: Tensor, out_dim: int) -> Tensor:
        if y.dim() == 2 and y.shape[1] == out_dim:
            if not bool(torch.isfinite(y).all()):
                raise SpecError("labels for gaussian contain NaN or inf")
            return y.to(torch.get_default_dtype())
        _check_rows(y, self.name)
        if out_dim != 1:
            raise SpecError(f"gaussian with {out_dim} outputs needs labels of shape "
                            f"(n, {out_dim}), got {list(y.shape)}")
        return y.to(torch.get_default_dtype())


@dataclass(frozen=True)
class Poisson(Family):
    """Poisson with log link, loss e^f − y f, 1 output, labels non-negative ints; Λ = e^f."""

    name: str = "poisson"

    def loss(self, f: Tensor, y: Tensor) -> Tensor:
        f = _as_2d(f)[..., 0]
        return torch.exp(f) - y.to(f.dtype) * f

    def grad_f(self, f: Tensor, y: Tensor) -> Tensor:
        return torch.exp(f) - _as_2d(y.to(f.dtype))

    def curvature(self, f: Tensor, u: Tensor) -> Tensor:
        return torch.exp(f) * u

    def predict(self, f: Tensor) -> Tensor:
        return torch.exp(_as_2d(f)[..., 0])

    def check_labels(self, y: Tensor, out_dim: int) -> Tensor:
        _check_rows(y, self.name)
        if out_dim != 1:
            raise SpecError(f"poisson needs a model with 1 output, has {out_dim}")
        if not _is_integral(y) or (y.numel() and y.min() < 0):
            raise SpecError("labels must be non-negative integers for poisson")
        return y.to(torch.get_default_dtype())


FAMILIES: dict[str, Family] = {
    "categorical": Categorical(),
    "bernoulli": Bernoulli(),
    "gaussian": Gaussian(),
    "poisson": Poisson(),
}


def get_family(name: str | Family) -> Family:
    """Look a family up by name; raises `SpecError` listing the known names."""
    if isinstance(name, Family):
        return name
    if name not in FAMILIES:
        raise SpecError(f"unknown family {name!r} (known: {', '.join(FAMILIES)})")
    return FAMILIES[name]
