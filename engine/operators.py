"""Curvature products over a `Problem`'s data, and gradient helpers.

Fisher (generalized Gauss-Newton):  F v = (1/n) Σ_i J_iᵀ Λ_i J_i v       (PSD)
Hessian of the data term:           H v = (1/n) Σ_i ∇²_θ ℓ_i v
An operator applies  C v = M v + λ∇²π v + δ v  with M = F or H, the penalty term
optional (`regularized`) and δ = `damping`. Vectors are flat over the in-scope
parameters: v is (d,) or (d, m) (m right-hand sides); the result has v's shape.

Product variants (`variant`), for one right-hand side:
  fisher:  "jvp_vjp"  torch.func.jvp, then Λ in output space, then a fresh torch.func.vjp
           "fused"    one forward carrying dual numbers (torch.autograd.forward_ad) that
                      also records the reverse graph, then one backward (the default)
  hessian: "fwd_rev"  forward-over-reverse, torch.func.jvp of torch.func.grad (default)
           "double_backward"  reverse-over-reverse with create_graph=True
Several right-hand sides go through vmapped "jvp_vjp" / "fwd_rev". `keep_graph=True`
reuses each batch's first-order graph across products (`KeptBatch`), for CG at fixed θ.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from engine.errors import SpecError
from engine.problem import Problem

logger = logging.getLogger(__name__)

FISHER_VARIANTS = ("fused", "jvp_vjp")
HESSIAN_VARIANTS = ("fwd_rev", "double_backward")
Params = Mapping[str, Tensor]


@runtime_checkable
class LinearOperator(Protocol):
    """What solvers need: a symmetric map on (d,) or (d, m) vectors."""

    d: int
    dtype: torch.dtype
    device: torch.device

    def matvec(self, v: Tensor) -> Tensor: ...


# ---- one batch, one tangent: sums over the rows of the batch --------------------------

def _fisher_jvp_vjp(problem: Problem, X: Tensor, t: Params) -> dict[str, Tensor]:
    p = problem.params()

    def fwd(params: Params) -> Tensor:
        return problem.forward(params, X)

    f, jf = torch.func.jvp(fwd, (p,), (dict(t),))[:2]
    u = problem.family.curvature(f.detach(), jf.detach())
    vjp_fn = torch.func.vjp(fwd, p)[1]
    return dict(vjp_fn(u)[0])


def _fisher_fused(problem: Problem, X: Tensor, t: Params) -> dict[str, Tensor]:
    leaves = {n: v.detach().requires_grad_(True) for n, v in problem.params().items()}
    with torch.enable_grad():
        with fwAD.dual_level():
            duals = {n: fwAD.make_dual(leaves[n], t[n]) for n in leaves}
            out = problem.forward(duals, X)
            primal, tangent = fwAD.unpack_dual(out)
            u = problem.family.curvature(primal.detach(), tangent.detach())
        # Backward after the dual level closes: the saved activations are plain tensors
        # again, so the backward does not also push tangents through every matmul.
        grads = torch.autograd.grad(primal, list(leaves.values()), grad_outputs=u,
                                    allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(leaves[n]))
            for n, g in zip(leaves, grads, strict=True)}


def _hessian_fwd_rev(problem: Problem, X: Tensor, y: Tensor, t: Params) -> dict[str, Tensor]:
    def loss_sum(params: Params) -> Tensor:
        return problem.family.loss(problem.forward(params, X), y).sum()

    hv = torch.func.jvp(torch.func.grad(loss_sum), (problem.params(),), (dict(t),))[1]
    return dict(hv)


def _hessian_double_backward(problem: Problem, X: Tensor, y: Tensor, t: Params
                             ) -> dict[str, Tensor]:
    leaves = {n: v.detach().requires_grad_(True) for n, v in problem.params().items()}
    with torch.enable_grad():
        loss = problem.family.loss(problem.forward(leaves, X), y).sum()
        grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
        dot = torch.stack([(g * t[n]).sum() for n, g in zip(leaves, grads, strict=True)]).sum()
        hv = torch.autograd.grad(dot, list(leaves.values()), allow_unused=True)
    return {n: (h if h is not None else torch.zeros_like(leaves[n]))
            for n, h in zip(leaves, hv, strict=True)}


VMAP_COLUMNS = 32  # right-hand sides pushed through one vmapped product (memory: × activations)


def _vmapped(problem: Problem, X: Tensor, y: Tensor, T: dict[str, Tensor], variant: str
             ) -> dict[str, Tensor]:
    """Products for m tangents at once (T: name -> (m, *shape)) with torch.func.vmap."""
    p = problem.params()

    def fwd(params: Params) -> Tensor:
        return problem.forward(params, X)

    if variant == "jvp_vjp":
        f, vjp_fn = torch.func.vjp(fwd, p)[:2]
        jf = torch.func.vmap(lambda t: torch.func.jvp(fwd, (p,), (t,))[1])(T)
        u = problem.family.curvature(f.detach(), jf)
        return dict(torch.func.vmap(lambda w: vjp_fn(w)[0])(u))

    def loss_sum(params: Params) -> Tensor:
        return problem.family.loss(problem.forward(params, X), y).sum()

    grad_fn = torch.func.grad(loss_sum)
    return dict(torch.func.vmap(lambda t: torch.func.jvp(grad_fn, (p,), (t,))[1])(T))


_VMAP_VARIANT = {"fused": "jvp_vjp", "jvp_vjp": "jvp_vjp", "fwd_rev": "fwd_rev",
                 "double_backward": "fwd_rev"}


def batch_product(problem: Problem, idx: Tensor, v: Tensor, kind: str = "fisher",
                  variant: str | None = None) -> Tensor:
    """Σ_{i∈idx} M_i v for one batch of rows (a sum, not a mean); v (d,) or (d, m).

    A single column uses `variant`. Several columns go through torch.func.vmap in blocks
    of VMAP_COLUMNS with the functional variant of the same matrix ("fused" -> "jvp_vjp",
    "double_backward" -> "fwd_rev"): forward_ad and create_graph do not compose with vmap,
    and the vmapped products are faster per column from about 4 columns on.
    """
    variant = _check_variant(kind, variant)
    X, y = problem.X[idx], problem.y[idx]
    columns = v.unsqueeze(1) if v.dim() == 1 else v
    out = []
    j = 0
    vmap_ok = True
    while j < columns.shape[1]:
        if vmap_ok and columns.shape[1] - j > 1:
            block = columns[:, j:j + VMAP_COLUMNS]
            try:
                res = _vmapped(problem, X, y, problem.unflatten(block), _VMAP_VARIANT[variant])
            except (RuntimeError, NotImplementedError) as exc:
                # A layer without a batching rule: fall back to one column at a time.
                logger.warning("vmapped %s product failed (%s); looping over columns",
                               kind, exc)
                vmap_ok = False
                continue
            out.append(problem.flatten(res, batched=True).detach())
            j += block.shape[1]
            continue
        t = problem.unflatten(columns[:, j])
        if variant == "fused":
            res = _fisher_fused(problem, X, t)
        elif variant == "jvp_vjp":
            res = _fisher_jvp_vjp(problem, X, t)
        elif variant == "fwd_rev":
            res = _hessian_fwd_rev(problem, X, y, t)
        else:
            res = _hessian_double_backward(problem, X, y, t)
        out.append(problem.flatten(res).detach().unsqueeze(1))
        j += 1
    stacked = torch.cat(out, dim=1)
    return stacked[:, 0] if v.dim() == 1 else stacked


def _check_variant(kind: str, variant: str | None) -> str:
    if kind == "fisher":
        variant = variant or "fused"
        allowed = FISHER_VARIANTS
    elif kind == "hessian":
        variant = variant or "fwd_rev"
        allowed = HESSIAN_VARIANTS
    else:
        raise SpecError(f"unknown curvature kind {kind!r} (known: fisher, hessian)")
    if variant not in allowed:
        raise SpecError(f"unknown {kind} variant {variant!r} (known: {', '.join(allowed)})")
    return variant


class KeptBatch:
    """Products on one fixed batch that reuse the first-order graph across calls.

    Fisher: torch.func.linearize (a traced JVP) plus a kept torch.func.vjp. Hessian: the
    gradient kept with create_graph=True, then one backward per product. Meant for solvers
    that apply C many times at a fixed θ (CG); the graph holds the batch's activations.
    """

    def __init__(self, problem: Problem, idx: Tensor, kind: str) -> None:
        self.problem, self.kind = problem, kind
        X, y = problem.X[idx], problem.y[idx]
        if kind == "fisher":
            p = problem.params()

            def fwd(params: Params) -> Tensor:
                return problem.forward(params, X)

            with warnings.catch_warnings():
                # linearize's constant folding warns about attributes it inlines; harmless.
                warnings.simplefilter("ignore", UserWarning)
                f, self._jvp = torch.func.linearize(fwd, p)
            self._vjp = torch.func.vjp(fwd, p)[1]
            self._f = f.detach()
            return
        self._leaves = {n: v.detach().requires_grad_(True) for n, v in problem.params().items()}
        with torch.enable_grad():
            loss = problem.family.loss(problem.forward(self._leaves, X), y).sum()
            self._grads = torch.autograd.grad(loss, list(self._leaves.values()),
                                              create_graph=True)

    def product(self, t: Params) -> dict[str, Tensor]:
        """Σ_{i in batch} M_i t for one tangent (name -> tensor)."""
        if self.kind == "fisher":
            u = self.problem.family.curvature(self._f, self._jvp(dict(t)))
            return dict(self._vjp(u)[0])
        names = list(self._leaves)
        with torch.enable_grad():
            dot = torch.stack([(g * t[n]).sum()
                               for n, g in zip(names, self._grads, strict=True)]).sum()
            hv = torch.autograd.grad(dot, list(self._leaves.values()), retain_graph=True,
                                     allow_unused=True)
        return {n: (h if h is not None else torch.zeros_like(self._leaves[n]))
                for n, h in zip(names, hv, strict=True)}

    def matvec(self, v: Tensor) -> Tensor:
        """Batch sum of products for v (d,) or (d, m) (columns in a loop)."""
        cols = v.unsqueeze(1) if v.dim() == 1 else v
        out = torch.stack([self.problem.flatten(self.product(self.problem.unflatten(c))).detach()
                           for c in cols.T], dim=1)
        return out[:, 0] if v.dim() == 1 else out


# ---- operators ------------------------------------------------------------------------

class CurvatureOperator:
    """C v = M v + λ∇²π v + δ v over all rows (or `indices`), summed batch by batch.

    M is the mean over the rows of the Fisher or the Hessian of the per-row loss. With
    `keep_graph`, each batch's first-order graph is built once and reused by every product
    (see `KeptBatch`): faster for many products at a fixed θ, at the memory cost of all
    batches' activations.
    """

    def __init__(self, problem: Problem, kind: str = "fisher", variant: str | None = None,
                 damping: float = 0.0, regularized: bool = True,
                 indices: Tensor | None = None, batch_size: int | None = None,
                 keep_graph: bool = False) -> None:
        self.problem = problem
        self.kind = kind
        self.variant = _check_variant(kind, variant)
        if not damping >= 0.0:
            raise SpecError(f"damping must be >= 0, got {damping}")
        self.damping = float(damping)
        self.regularized = regularized
        self.indices = indices
        self.batch_size = batch_size or problem.batch_size
        self.d = problem.d
        self.dtype = problem.dtype
        self.device = problem.device
        self.rows = problem.n if indices is None else int(indices.shape[0])
        self._diag = problem.reg_curvature_diag() if regularized else None
        self.products = 0  # number of matvec calls, one per column
        # Limitation: kept graphs snapshot θ at first use; build a new operator after θ
        # changes (operators are cheap to build, the graphs are what costs memory).
        self.keep_graph = keep_graph
        self._kept: list[KeptBatch] | None = None

    def _extra(self, v: Tensor) -> Tensor:
        extra = self.damping * v
        if self._diag is not None:
            extra = extra + (self._diag if v.dim() == 1 else self._diag[:, None]) * v
        return extra

    def data_product(self, v: Tensor) -> Tensor:
        """M v only (no penalty, no damping)."""
        total = torch.zeros_like(v)
        if self.keep_graph:
            if self._kept is None:
                self._kept = [KeptBatch(self.problem, idx, self.kind)
                              for idx in self.problem.batches(self.indices, self.batch_size)]
            for kept in self._kept:
                total += kept.matvec(v)
            return total / self.rows
        for idx in self.problem.batches(self.indices, self.batch_size):
            total += batch_product(self.problem, idx, v, self.kind, self.variant)
        return total / self.rows

    def matvec(self, v: Tensor) -> Tensor:
        """C v for v (d,) or (d, m)."""
        v = v.to(self.device, self.dtype)
        self.products += 1 if v.dim() == 1 else v.shape[1]
        return self.data_product(v) + self._extra(v)

    __call__ = matvec

    def with_damping(self, damping: float) -> CurvatureOperator:
        return CurvatureOperator(self.problem, self.kind, self.variant, damping,
                                 self.regularized, self.indices, self.batch_size,
                                 self.keep_graph)

    def minibatch(self, batch_size: int, seed: int = 0) -> MinibatchOperator:
        """The same C, estimated on a fresh random batch of rows at every call."""
        return MinibatchOperator(self, batch_size, seed)

    def dense(self, chunk: int = 64) -> Tensor:
        """The d × d matrix of C (small d only): the Fisher from per-row Jacobians, the
        Hessian by products with identity columns."""
        if self.kind == "hessian":
            fast = CurvatureOperator(self.problem, "hessian", "fwd_rev", self.damping,
                                     self.regularized, self.indices, self.batch_size)
            return dense_matrix(fast, chunk)
        data = dense_fisher(self.problem, self.indices)
        return data + torch.diag(self._extra(torch.ones(self.d, dtype=self.dtype,
                                                        device=self.device)))


    def diagonal(self) -> Tensor:
        """Diagonal of C for a Jacobi preconditioner, (d,). For the Hessian this is the
        Fisher's diagonal (+ penalty + δ): a positive stand-in, exact for GLMs."""
        data = fisher_diagonal(self.problem, self.indices)
        return data + self._extra(torch.ones(self.d, dtype=self.dtype, device=self.device))


class MinibatchOperator:
    """C_B v with B a fresh uniform batch (without replacement) of the parent's rows."""

    def __init__(self, parent: CurvatureOperator, batch_size: int, seed: int = 0) -> None:
        if batch_size < 1:
            raise SpecError(f"batch_size must be >= 1, got {batch_size}")
        self.parent = parent
        self.batch_size = min(batch_size, parent.rows)
        self.generator = torch.Generator().manual_seed(seed)
        self.d, self.dtype, self.device = parent.d, parent.dtype, parent.device
        self.products = 0

    def matvec(self, v: Tensor) -> Tensor:
        pick = torch.randperm(self.parent.rows, generator=self.generator)[:self.batch_size]
        pick = pick.to(self.device)
        idx = pick if self.parent.indices is None else self.parent.indices[pick]
        v = v.to(self.device, self.dtype)
        self.products += 1 if v.dim() == 1 else v.shape[1]
        data = batch_product(self.parent.problem, idx, v, self.parent.kind,
                             self.parent.variant) / self.batch_size
        return data + self.parent._extra(v)

    __call__ = matvec


class DenseOperator:
    """An explicit symmetric matrix as an operator (tests, small problems)."""

    def __init__(self, matrix: Tensor) -> None:
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise SpecError(f"DenseOperator needs a square matrix, got {list(matrix.shape)}")
        self.matrix = matrix
        self.d = matrix.shape[0]
        self.dtype, self.device = matrix.dtype, matrix.device
        self.products = 0

    def matvec(self, v: Tensor) -> Tensor:
        self.products += 1 if v.dim() == 1 else v.shape[1]
        return self.matrix @ v.to(self.dtype)

    __call__ = matvec

    def dense(self, chunk: int = 64) -> Tensor:
        return self.matrix

    def diagonal(self) -> Tensor:
        return torch.diagonal(self.matrix).clone()


def fisher_operator(problem: Problem, damping: float = 0.0, regularized: bool = True,
                    variant: str = "fused", indices: Tensor | None = None) -> CurvatureOperator:
    """Full-data C = F + λ∇²π + δI (penalty term only if `regularized`)."""
    return CurvatureOperator(problem, "fisher", variant, damping, regularized, indices)


def hessian_operator(problem: Problem, damping: float = 0.0, regularized: bool = True,
                     variant: str = "fwd_rev", indices: Tensor | None = None
                     ) -> CurvatureOperator:
    """Full-data C = H + λ∇²π + δI (the infinitesimal-jackknife curvature)."""
    return CurvatureOperator(problem, "hessian", variant, damping, regularized, indices)


def curvature_operator(problem: Problem, method: str = "fisher", damping: float = 0.0,
                       regularized: bool = True, variant: str | None = None
                       ) -> CurvatureOperator:
    """`method` is "fisher" (AFIF) or "hessian" (IJ)."""
    return CurvatureOperator(problem, method, variant, damping, regularized)


def dense_matrix(op: LinearOperator | Callable[[Tensor], Tensor], chunk: int = 64) -> Tensor:
    """Materialize a d × d operator by products with blocks of identity columns."""
    matvec = op.matvec if isinstance(op, LinearOperator) else op
    d = op.d if isinstance(op, LinearOperator) else None
    if d is None:
        raise SpecError("dense_matrix needs an operator with a dimension d")
    eye = torch.eye(d, dtype=op.dtype, device=op.device)  # type: ignore[union-attr]
    cols = [matvec(eye[:, s:s + chunk]) for s in range(0, d, chunk)]
    mat = torch.cat(cols, dim=1)
    return 0.5 * (mat + mat.T)


def output_jacobians(problem: Problem, idx: Tensor) -> Tensor:
    """J_i = ∂f(x_i)/∂θ for the rows idx, (b, K, d), by reverse mode per output."""
    params = problem.params()

    def one(x: Tensor) -> dict[str, Tensor]:
        return torch.func.jacrev(lambda p: problem.forward(p, x.unsqueeze(0))[0])(params)

    jac = torch.func.vmap(one)(problem.X[idx])
    b = int(idx.shape[0])
    return torch.cat([jac[n].reshape(b, problem.out_dim, -1) for n in problem.names], dim=2)


def dense_fisher(problem: Problem, indices: Tensor | None = None) -> Tensor:
    """F = (1/n) Σ_i J_iᵀ Λ_i J_i as a d × d matrix (no penalty), from per-row Jacobians."""
    rows = problem.n if indices is None else int(indices.shape[0])
    per_row = problem.out_dim * problem.d * 3
    chunk = max(1, min(problem.batch_size, 20_000_000 // max(per_row, 1)))
    total = torch.zeros(problem.d, problem.d, dtype=problem.dtype, device=problem.device)
    for idx in problem.batches(indices, chunk):
        J = output_jacobians(problem, idx)
        with torch.no_grad():
            f = problem.forward(None, problem.X[idx])
        # Λ acts on the output axis: move it last, broadcast f over the d columns.
        LJ = problem.family.curvature(f.unsqueeze(1), J.transpose(1, 2)).transpose(1, 2)
        total += torch.einsum("bkd,bke->de", J, LJ)
    total /= rows
    return 0.5 * (total + total.T)


def fisher_diagonal(problem: Problem, indices: Tensor | None = None) -> Tensor:
    """diag F = (1/n) Σ_i Σ_k J_ik ⊙ (Λ_i J_i)_k, (d,), from per-row Jacobians.

    Costs about K backward passes over the rows; memory b·K·d per chunk of rows.
    """
    rows = problem.n if indices is None else int(indices.shape[0])
    chunk = max(1, min(problem.batch_size, 20_000_000 // max(problem.out_dim * problem.d * 3,
                                                             1)))
    total = torch.zeros(problem.d, dtype=problem.dtype, device=problem.device)
    for idx in problem.batches(indices, chunk):
        J = output_jacobians(problem, idx)
        with torch.no_grad():
            f = problem.forward(None, problem.X[idx])
        LJ = problem.family.curvature(f.unsqueeze(1), J.transpose(1, 2)).transpose(1, 2)
        total += torch.einsum("bkd,bkd->d", J, LJ)
    return total / rows


def power_iteration(op: LinearOperator, iters: int = 100, tol: float = 1e-3, seed: int = 0,
                    progress: Callable[[str, int, int], None] | None = None) -> float:
    """Estimate the largest |eigenvalue| of a symmetric operator (Rayleigh quotient).

    Stops when the estimate changes by less than `tol` relatively. For a PSD operator this
    is λ_max from below; callers scale it up a little (e.g. 1.05×) for safety.
    """
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(op.d, generator=gen, dtype=op.dtype).to(op.device)
    v /= torch.linalg.norm(v)
    estimate = 0.0
    for it in range(iters):
        if progress is not None:
            progress("power_iteration", it, iters)
        w = op.matvec(v)
        norm = float(torch.linalg.norm(w))
        if norm == 0.0 or not torch.isfinite(w).all():
            return norm
        new = abs(float(v @ w))
        v = w / norm
        if it > 0 and abs(new - estimate) <= tol * max(new, 1e-300):
            estimate = max(new, norm) if it == iters - 1 else new
            break
        estimate = new
    return max(estimate, 0.0)


# ---- gradients ------------------------------------------------------------------------

def mean_gradient(problem: Problem, weights: Tensor | None = None,
                  indices: Tensor | None = None, regularized: bool = False) -> Tensor:
    """(1/n) Σ_i w_i ∇_θ ℓ_i over rows (all or `indices`, with n = their count), (d,).

    With `regularized`, the gradient of the smooth part of λπ is added.
    """
    leaves = {n: v.detach().requires_grad_(True) for n, v in problem.params().items()}
    rows = problem.n if indices is None else int(indices.shape[0])
    total = torch.zeros(problem.d, dtype=problem.dtype, device=problem.device)
    for idx in problem.batches(indices):
        with torch.enable_grad():
            ell = problem.family.loss(problem.forward(leaves, problem.X[idx]), problem.y[idx])
            if weights is not None:
                ell = ell * weights.to(problem.device, problem.dtype)[idx]
            grads = torch.autograd.grad(ell.sum(), list(leaves.values()), allow_unused=True)
        total += torch.cat([(g if g is not None else torch.zeros_like(leaves[n])).reshape(-1)
                            for n, g in zip(leaves, grads, strict=True)])
    total /= rows
    if regularized:
        total += problem.reg_grad(problem.theta())
    return total


def per_sample_gradients(problem: Problem, indices: Tensor | None = None) -> Tensor:
    """∇_θ ℓ_i for each row, (b, d); memory b·d, so for small problems only."""
    params = problem.params()

    def one(x: Tensor, y: Tensor) -> Tensor:
        def loss(p: Params) -> Tensor:
            return problem.family.loss(problem.forward(p, x.unsqueeze(0)), y.unsqueeze(0))[0]

        return problem.flatten(torch.func.grad(loss)(params))

    out = [torch.func.vmap(one)(problem.X[idx], problem.y[idx])
           for idx in problem.batches(indices)]
    return torch.cat(out)


def loss_directional_derivatives(problem: Problem, s: Tensor, indices: Tensor | None = None
                                 ) -> Tensor:
    """g_iᵀ s = ∇_θ ℓ_i · s for every row, (b,), by one forward-mode pass (no b × d matrix).

    s may be (d,) or (d, m), giving (b,) or (b, m).
    """
    cols = s.unsqueeze(1) if s.dim() == 1 else s
    params = problem.params()
    out = []
    for idx in problem.batches(indices):
        X, y = problem.X[idx], problem.y[idx]

        def losses(p: Params, X: Tensor = X, y: Tensor = y) -> Tensor:
            return problem.family.loss(problem.forward(p, X), y)

        per_col = [torch.func.jvp(losses, (params,), (problem.unflatten(cols[:, j]),))[1]
                   for j in range(cols.shape[1])]
        out.append(torch.stack(per_col, dim=1).detach())
    res = torch.cat(out)
    return res[:, 0] if s.dim() == 1 else res
