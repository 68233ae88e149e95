"""Penalties λπ(θ) over named parameter tensors (the in-scope ones).

Conventions (λ = `strength`):
  none         0
  l2           λ·½‖θ‖²
  l1           λ·‖θ‖₁
  elastic_net  λ·(α‖θ‖₁ + (1−α)·½‖θ‖²), α = `l1_ratio`
  group_lasso  λ·Σ_g ‖θ_g‖₂; groups are parameter tensors by default, or lists of names.
Parameters named in `exclude` (e.g. biases) are not penalized. `grad` and `hvp` cover the
smooth part only; `prox` is the Euclidean prox of the whole penalty with step t:
argmin_x ½‖x − θ‖² + t·λπ(x).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from engine.errors import SpecError

logger = logging.getLogger(__name__)

KINDS = ("none", "l2", "l1", "elastic_net", "group_lasso")
Params = Mapping[str, Tensor]


def _soft(x: Tensor, threshold: float) -> Tensor:
    return torch.sign(x) * torch.clamp(x.abs() - threshold, min=0.0)


@dataclass(frozen=True)
class Regularizer:
    """A penalty; build with `make_regularizer`. All methods take and return name->tensor."""

    kind: str = "none"
    strength: float = 0.0
    exclude: tuple[str, ...] = ()
    groups: tuple[tuple[str, ...], ...] | None = None
    l1_ratio: float = 0.5
    _excluded: frozenset[str] = field(default=frozenset(), repr=False)

    @property
    def smooth(self) -> bool:
        """True when the whole penalty is twice differentiable (none, l2)."""
        return self.kind in ("none", "l2") or self.strength == 0.0

    @property
    def l2_coefficient(self) -> float:
        """c such that the smooth part is c·½‖θ‖² on penalized parameters."""
        if self.kind == "l2":
            return self.strength
        if self.kind == "elastic_net":
            return self.strength * (1.0 - self.l1_ratio)
        return 0.0

    @property
    def l1_coefficient(self) -> float:
        if self.kind == "l1":
            return self.strength
        if self.kind == "elastic_net":
            return self.strength * self.l1_ratio
        return 0.0

    def penalized(self, name: str) -> bool:
        return self.kind != "none" and name not in self._excluded

    def check_names(self, names: Iterable[str]) -> None:
        """Raise `SpecError` if `exclude` or `groups` name a parameter not in `names`."""
        known = set(names)
        unknown = [n for n in self.exclude if n not in known]
        for group in self.groups or ():
            unknown += [n for n in group if n not in known]
        if unknown:
            raise SpecError(f"regularizer names unknown or out-of-scope parameters: "
                            f"{', '.join(sorted(set(unknown)))}")

    def _groups(self, params: Params) -> list[list[str]]:
        if self.groups is None:
            return [[n] for n in params if self.penalized(n)]
        return [[n for n in g if n in params and self.penalized(n)] for g in self.groups]

    def value(self, params: Params) -> Tensor:
        """λπ(θ), a scalar tensor."""
        total = torch.zeros((), dtype=next(iter(params.values())).dtype)
        if self.kind == "none" or self.strength == 0.0:
            return total
        if self.kind == "group_lasso":
            for group in self._groups(params):
                if group:
                    sq = torch.stack([(params[n] ** 2).sum() for n in group]).sum()
                    total = total + self.strength * torch.sqrt(sq)
            return total
        for name, theta in params.items():
            if self.penalized(name):
                total = total + self.l2_coefficient * 0.5 * (theta * theta).sum()
                total = total + self.l1_coefficient * theta.abs().sum()
        return total

    def grad(self, params: Params) -> dict[str, Tensor]:
        """Gradient of the smooth part of λπ."""
        c = self.l2_coefficient
        return {n: (c * t if self.penalized(n) else torch.zeros_like(t))
                for n, t in params.items()}

    def hvp(self, params: Params, v: Params) -> dict[str, Tensor]:
        """Curvature of the smooth part applied to v (same names and shapes as params)."""
        c = self.l2_coefficient
        return {n: (c * v[n] if self.penalized(n) else torch.zeros_like(v[n])) for n in params}

    def curvature_diag(self, name: str) -> float:
        """The smooth part's curvature is c·I on each penalized tensor: return c for `name`."""
        return self.l2_coefficient if self.penalized(name) else 0.0

    def prox(self, params: Params, t: float) -> dict[str, Tensor]:
        """argmin_x ½‖x − θ‖² + t·λπ(x), tensor by tensor (group by group)."""
        out = {n: p.clone() for n, p in params.items()}
        if self.kind == "none" or self.strength == 0.0:
            return out
        if self.kind == "group_lasso":
            for group in self._groups(params):
                if not group:
                    continue
                norm = torch.sqrt(torch.stack([(params[n] ** 2).sum() for n in group]).sum())
                shrink = torch.clamp(1 - t * self.strength / torch.clamp(norm, min=1e-300),
                                     min=0.0)
                for n in group:
                    out[n] = params[n] * shrink
            return out
        for name, theta in params.items():
            if self.penalized(name):
                out[name] = _soft(theta, t * self.l1_coefficient) / (
                    1.0 + t * self.l2_coefficient)
        return out


def make_regularizer(
    kind: str = "none",
    strength: float = 0.0,
    exclude: Sequence[str] = (),
    groups: Sequence[Sequence[str]] | None = None,
    l1_ratio: float = 0.5,
) -> Regularizer:
    """Build a penalty; raises `SpecError` on an unknown kind or a bad strength/ratio."""
    if kind not in KINDS:
        raise SpecError(f"unknown regularizer {kind!r} (known: {', '.join(KINDS)})")
    strength = float(strength)
    if not strength >= 0.0 or strength == float("inf"):
        raise SpecError(f"regularizer strength must be a finite number >= 0, got {strength}")
    if kind == "none":
        strength = 0.0
    if kind == "elastic_net" and not 0.0 <= l1_ratio <= 1.0:
        raise SpecError(f"elastic_net l1_ratio must lie in [0, 1], got {l1_ratio}")
    if groups is not None and kind != "group_lasso":
        raise SpecError("'groups' applies to group_lasso only")
    frozen_groups = None if groups is None else tuple(tuple(g) for g in groups)
    return Regularizer(kind=kind, strength=strength, exclude=tuple(exclude),
                       groups=frozen_groups, l1_ratio=float(l1_ratio),
                       _excluded=frozenset(exclude))
