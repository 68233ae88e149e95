"""A training problem: model + family + penalty + data, with the in-scope parameters θ.

θ is the flat vector (d,) of the in-scope parameters in model order; everything else
(out-of-scope parameters and buffers) is frozen. The model always runs in eval mode.
Objective: L(θ; w) = (1/n) Σ_i w_i ℓ(z_i, θ) + λπ(θ).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from engine.device import resolve_device
from engine.errors import SpecError
from engine.families import Family, get_family
from engine.regularizers import Regularizer, make_regularizer
from engine.spec import build_model, load_weights

logger = logging.getLogger(__name__)

ArrayLike = Tensor | np.ndarray | Sequence[Any]


def _to_tensor(a: ArrayLike, what: str) -> Tensor:
    if isinstance(a, Tensor):
        return a.detach()
    arr = np.asarray(a)
    if arr.dtype == object:
        raise SpecError(f"{what} must be numeric")
    return torch.from_numpy(np.ascontiguousarray(arr))


class Problem:
    """Model, family, regularizer and data (X (n, ...), y (n,)) on one device."""

    def __init__(
        self,
        model: nn.Module,
        family: str | Family,
        regularizer: Regularizer | None,
        X: ArrayLike,
        y: ArrayLike,
        scope: Sequence[str] | None = None,
        batch_size: int = 1024,
        device: str | torch.device | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.family = get_family(family)
        self.regularizer = regularizer if regularizer is not None else make_regularizer("none")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise SpecError(f"batch_size must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size

        # Scope: the parameters influence is computed for; the rest stay frozen.
        all_names = [n for n, _ in self.model.named_parameters()]
        if scope is None:
            names = all_names
        else:
            unknown = [s for s in scope if s not in all_names]
            if unknown:
                raise SpecError(f"scope names unknown parameters: {', '.join(unknown)} "
                                f"(known: {', '.join(all_names)})")
            if not scope:
                raise SpecError("scope must name at least one parameter")
            names = [n for n in all_names if n in set(scope)]
        self.names: list[str] = names
        self.regularizer.check_names(all_names)
        state = dict(self.model.state_dict(keep_vars=False))
        self.dtype = next(iter(state[n] for n in names)).dtype
        self._params = {n: state[n].detach().clone() for n in names}
        self._frozen = {k: v.detach() for k, v in state.items() if k not in self._params}
        self.shapes = [tuple(self._params[n].shape) for n in names]
        self.numels = [self._params[n].numel() for n in names]
        self.d = int(sum(self.numels))

        # Data: X in the model's dtype (integer indices for an embedding input).
        # Limitation: X and y live on the device whole (batches are slices of them); data
        # larger than device memory needs a streaming Problem, which does not exist yet.
        X_t = _to_tensor(X, "X")
        if X_t.dim() < 1 or X_t.shape[0] == 0:
            raise SpecError("X must have at least one row")
        if X_t.is_floating_point() or not self._takes_indices():
            X_t = X_t.to(self.dtype)
            if not bool(torch.isfinite(X_t).all()):
                raise SpecError("X contains NaN or inf")
        self.X = X_t.to(self.device)
        self.n = int(self.X.shape[0])
        y_t = _to_tensor(y, "y")
        if y_t.shape[0] != self.n:
            raise SpecError(f"X has {self.n} rows but y has {y_t.shape[0]}")
        try:
            with torch.no_grad():
                f0 = self.forward(None, self.X[:1])
        except (RuntimeError, ValueError, IndexError) as exc:
            raise SpecError(f"X rows of shape {list(self.X.shape[1:])} do not fit the model: "
                            f"{exc}") from exc
        self.out_dim = int(f0.shape[-1])
        y_t = self.family.check_labels(y_t, self.out_dim)
        self.y = (y_t if not y_t.is_floating_point() else y_t.to(self.dtype)).to(self.device)

    def _takes_indices(self) -> bool:
        first = next(iter(self.model.children()), None)
        return isinstance(first, nn.Embedding)

    @classmethod
    def from_spec(
        cls,
        architecture: dict[str, Any],
        weights: Mapping[str, Tensor],
        family: str | Family,
        regularizer: Regularizer | None,
        X: ArrayLike,
        y: ArrayLike,
        scope: Sequence[str] | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 1024,
        dtype: torch.dtype | None = None,
    ) -> Problem:
        """Build the model from its JSON architecture and strict weights, then the problem."""
        if dtype is None:
            floats = [t.dtype for t in weights.values() if t.is_floating_point()]
            dtype = floats[0] if floats else torch.float32
        model = build_model(architecture, dtype=dtype)
        load_weights(model, weights)
        return cls(model, family, regularizer, X, y, scope=scope, batch_size=batch_size,
                   device=device)

    # ---- parameters -------------------------------------------------------------------

    def params(self) -> dict[str, Tensor]:
        """Current in-scope parameters, name -> tensor (do not modify in place)."""
        return dict(self._params)

    def frozen(self) -> dict[str, Tensor]:
        """Out-of-scope parameters and all buffers."""
        return dict(self._frozen)

    def theta(self) -> Tensor:
        """Flat in-scope parameters, (d,)."""
        return self.flatten(self._params)

    def flatten(self, tensors: Mapping[str, Tensor], batched: bool = False) -> Tensor:
        """name -> tensor to a flat (d,); with batched=True, name -> (m, *shape) to (d, m)."""
        if batched:
            return torch.cat([tensors[n].reshape(tensors[n].shape[0], -1)
                              for n in self.names], dim=1).T
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """Flat (d,) -> name -> tensor; (d, m) -> name -> (m, *shape)."""
        if vec.shape[0] != self.d:
            raise SpecError(f"vector has {vec.shape[0]} entries, the scope has {self.d}")
        pieces = torch.split(vec, self.numels, dim=0)
        if vec.dim() == 1:
            return {n: p.reshape(s) for n, p, s in zip(self.names, pieces, self.shapes,
                                                        strict=True)}
        m = vec.shape[1]
        return {n: p.T.reshape(m, *s) for n, p, s in zip(self.names, pieces, self.shapes,
                                                          strict=True)}

    def set_theta(self, theta: Tensor) -> None:
        """Replace the in-scope parameters (also written into the model)."""
        self.set_params(self.unflatten(theta.detach().to(self.device, self.dtype)))

    def set_params(self, params: Mapping[str, Tensor]) -> None:
        new = {n: params[n].detach().to(self.device, self.dtype).clone() for n in self.names}
        self._params = new
        with torch.no_grad():
            state = self.model.state_dict()
            for n, t in new.items():
                state[n].copy_(t)

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load a full state dict (strict names, see `engine.spec.load_weights`)."""
        load_weights(self.model, state)
        full = self.model.state_dict()
        self._params = {n: full[n].detach().clone() for n in self.names}
        self._frozen = {k: v.detach() for k, v in full.items() if k not in self._params}

    def state_dict(self, theta: Tensor | None = None) -> dict[str, Tensor]:
        """Full state dict (cloned, on CPU); with `theta`, the in-scope part replaced by it."""
        params = self._params if theta is None else self.unflatten(theta)
        out = {k: v.detach().clone().cpu() for k, v in self.model.state_dict().items()}
        for n in self.names:
            out[n] = params[n].detach().clone().cpu().to(out[n].dtype)
        return out

    def clone(self, dtype: torch.dtype | None = None) -> Problem:
        """An independent copy (model deep-copied), optionally in another float dtype."""
        model = copy.deepcopy(self.model)
        if dtype is not None:
            model = model.to(dtype)
        X = self.X if not self.X.is_floating_point() or dtype is None else self.X.to(dtype)
        return Problem(model, self.family, self.regularizer, X, self.y.cpu(),
                       scope=self.names if self.names != self._all_names() else None,
                       batch_size=self.batch_size, device=self.device)

    def _all_names(self) -> list[str]:
        return [n for n, _ in self.model.named_parameters()]

    # ---- evaluation -------------------------------------------------------------------

    def forward(self, params: Mapping[str, Tensor] | None, X: Tensor) -> Tensor:
        """Model outputs f (b, K) with the in-scope parameters replaced by `params`."""
        state = {**self._frozen, **(self._params if params is None else params)}
        f = functional_call(self.model, state, (X,))
        return f.unsqueeze(-1) if f.dim() == 1 else f

    def batches(self, indices: Tensor | None = None, batch_size: int | None = None
                ) -> Iterator[Tensor]:
        """Index tensors of consecutive batches over `indices` (default: all rows)."""
        idx = torch.arange(self.n, device=self.device) if indices is None else indices
        size = batch_size or self.batch_size
        for start in range(0, idx.shape[0], size):
            yield idx[start:start + size]

    def losses(self, params: Mapping[str, Tensor] | None = None, indices: Tensor | None = None
               ) -> Tensor:
        """Per-row losses ℓ_i, (n,) (or len(indices),), evaluated batch by batch."""
        out = []
        for idx in self.batches(indices):
            out.append(self.family.loss(self.forward(params, self.X[idx]), self.y[idx]))
        return torch.cat(out)

    def objective(self, params: Mapping[str, Tensor] | None = None,
                  weights: Tensor | None = None) -> Tensor:
        """L(θ; w) = (1/n) Σ w_i ℓ_i + λπ(θ), a scalar (differentiable in `params`)."""
        params = self._params if params is None else params
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for idx in self.batches():
            ell = self.family.loss(self.forward(params, self.X[idx]), self.y[idx])
            if weights is not None:
                ell = ell * weights[idx]
            total = total + ell.sum()
        return total / self.n + self.regularizer.value(params)

    def predict(self, X: ArrayLike | None = None) -> Tensor:
        """Family mean (probabilities or regression mean) on X (default: training X)."""
        X_t = self.X if X is None else self.as_inputs(X)
        with torch.no_grad():
            return torch.cat([self.family.predict(self.forward(None, X_t[i:i + self.batch_size]))
                              for i in range(0, X_t.shape[0], self.batch_size)])

    def as_inputs(self, X: ArrayLike) -> Tensor:
        """Convert new inputs (e.g. a test set) to the problem's device and dtype."""
        X_t = _to_tensor(X, "X")
        if X_t.shape[1:] != self.X.shape[1:]:
            raise SpecError(f"inputs have row shape {list(X_t.shape[1:])}, the training "
                            f"data {list(self.X.shape[1:])}")
        if X_t.is_floating_point() or self.X.is_floating_point():
            X_t = X_t.to(self.X.dtype)
        return X_t.to(self.device)

    def as_labels(self, y: ArrayLike) -> Tensor:
        """Validate and convert labels for this family and output size."""
        y_t = self.family.check_labels(_to_tensor(y, "y"), self.out_dim)
        return (y_t if not y_t.is_floating_point() else y_t.to(self.dtype)).to(self.device)

    # ---- the penalty on flat vectors --------------------------------------------------

    def reg_value(self, theta: Tensor) -> Tensor:
        return self.regularizer.value(self.unflatten(theta))

    def reg_grad(self, theta: Tensor) -> Tensor:
        """Gradient of the smooth part of λπ at θ, (d,)."""
        return self.flatten(self.regularizer.grad(self.unflatten(theta)))

    def reg_prox(self, theta: Tensor, step: float) -> Tensor:
        """argmin_x ½‖x − θ‖² + step·λπ(x), (d,)."""
        return self.flatten(self.regularizer.prox(self.unflatten(theta), step))

    def reg_curvature_diag(self) -> Tensor:
        """Diagonal of λ∇²π (smooth part), (d,): the penalty's curvature is diagonal."""
        parts = [torch.full((k,), self.regularizer.curvature_diag(n), dtype=self.dtype,
                            device=self.device) for n, k in zip(self.names, self.numels,
                                                                strict=True)]
        return torch.cat(parts)
