"""Families: losses against torch's reference losses, curvature against torch.func.hessian."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.errors import SpecError
from engine.families import get_family

GEN = torch.Generator().manual_seed(0)


def _case(name: str, n: int = 7, k: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Random outputs f (n, K) and valid labels for the family."""
    if name == "categorical":
        return torch.randn(n, k, generator=GEN, dtype=torch.float64), \
            torch.randint(0, k, (n,), generator=GEN)
    f = torch.randn(n, 1, generator=GEN, dtype=torch.float64)
    if name == "bernoulli":
        return f, torch.randint(0, 2, (n,), generator=GEN).double()
    if name == "poisson":
        return f, torch.randint(0, 6, (n,), generator=GEN).double()
    return f, torch.randn(n, generator=GEN, dtype=torch.float64)


def _reference_loss(name: str, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-row losses from torch's own loss functions (or the textbook formula)."""
    if name == "categorical":
        return F.cross_entropy(f, y, reduction="none")
    if name == "bernoulli":
        return F.binary_cross_entropy_with_logits(f[:, 0], y, reduction="none")
    if name == "poisson":
        return F.poisson_nll_loss(f[:, 0], y, log_input=True, full=False, reduction="none")
    return 0.5 * (f[:, 0] - y) ** 2


FAMILIES = ["categorical", "bernoulli", "gaussian", "poisson"]


@pytest.mark.parametrize("name", FAMILIES)
def test_loss_matches_reference(name: str) -> None:
    fam = get_family(name)
    f, y = _case(name)
    torch.testing.assert_close(fam.loss(f, y), _reference_loss(name, f, y))


@pytest.mark.parametrize("name", FAMILIES)
def test_grad_and_curvature_match_autodiff(name: str) -> None:
    fam = get_family(name)
    f, y = _case(name)
    u = torch.randn(f.shape, generator=GEN, dtype=torch.float64)

    for i in range(f.shape[0]):
        def row_loss(fi: torch.Tensor, i: int = i) -> torch.Tensor:
            return _reference_loss(name, fi.unsqueeze(0), y[i:i + 1])[0]

        hess = torch.func.hessian(row_loss)(f[i])
        grad = torch.func.grad(row_loss)(f[i])
        torch.testing.assert_close(fam.curvature(f[i:i + 1], u[i:i + 1])[0], hess @ u[i])
        torch.testing.assert_close(fam.grad_f(f[i:i + 1], y[i:i + 1])[0], grad)


def test_categorical_curvature_is_psd_and_kills_constant_shifts() -> None:
    fam = get_family("categorical")
    f = torch.randn(1, 5, generator=GEN, dtype=torch.float64)
    lam = torch.stack([fam.curvature(f, e.unsqueeze(0))[0] for e in torch.eye(5).double()])
    assert np.linalg.eigvalsh(lam.numpy()).min() > -1e-12
    torch.testing.assert_close(fam.curvature(f, torch.ones(1, 5).double()),
                               torch.zeros(1, 5).double())


@pytest.mark.parametrize("name", FAMILIES)
def test_forward_mode_through_the_loss(name: str) -> None:
    # The pitfall F.mse_loss hits on torch 2.13: jvp of grad must work for every family.
    fam = get_family(name)
    f, y = _case(name)
    t = torch.randn(f.shape, generator=GEN, dtype=torch.float64)

    def total(g: torch.Tensor) -> torch.Tensor:
        return fam.loss(g, y).sum()

    _, hv = torch.func.jvp(torch.func.grad(total), (f,), (t,))
    torch.testing.assert_close(hv, fam.curvature(f, t))


def test_predict() -> None:
    f = torch.tensor([[0.0], [np.log(3.0)]], dtype=torch.float64)
    torch.testing.assert_close(get_family("bernoulli").predict(f),
                               torch.tensor([0.5, 0.75], dtype=torch.float64))
    torch.testing.assert_close(get_family("poisson").predict(f),
                               torch.tensor([1.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(get_family("gaussian").predict(f), f[:, 0])
    probs = get_family("categorical").predict(torch.zeros(2, 4))
    torch.testing.assert_close(probs, torch.full((2, 4), 0.25))


@pytest.mark.parametrize(("name", "labels", "out_dim", "fragment"), [
    ("bernoulli", [0, 1, 2], 1, "labels must be 0/1 for bernoulli"),
    ("bernoulli", [0, 1], 2, "1 output"),
    ("categorical", [0, 3], 3, "labels must be integers 0..2"),
    ("categorical", [0.5, 1], 3, "labels must be integers"),
    ("categorical", [0, 1], 1, "at least 2 outputs"),
    ("poisson", [0, -1], 1, "non-negative integers"),
    ("poisson", [0, 1.5], 1, "non-negative integers"),
    ("gaussian", [0.0, float("nan")], 1, "NaN or inf"),
    ("gaussian", [0.0, 1.0], 2, "labels of shape"),
    ("gaussian", [[0.0, 1.0]], 1, "1-d"),
])
def test_bad_labels_are_named(name: str, labels: list, out_dim: int, fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        get_family(name).check_labels(torch.tensor(labels), out_dim)
    assert fragment in str(info.value)


def test_labels_are_canonicalized_and_unknown_family_rejected() -> None:
    assert get_family("categorical").check_labels(torch.tensor([0.0, 2.0]), 3).dtype == \
        torch.long
    assert get_family("gaussian").check_labels(torch.zeros(3, 2), 2).shape == (3, 2)
    with pytest.raises(SpecError, match="unknown family 'gamma'"):
        get_family("gamma")
