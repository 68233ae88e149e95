"""Objectives: fairness metrics against numpy formulas, χ² behaviour, input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.integrate import trapezoid
from scipy.stats import gaussian_kde, norm

from engine.errors import SpecError
from engine.families import get_family
from engine.objectives import (
    accuracy,
    chi2_kde,
    make_fairness_objective,
    mean_loss,
    mean_squared_error,
    predicted_mean,
)


def _gaussian_pair(n: int, rho: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    z = np.random.default_rng(seed).normal(size=(n, 2))
    return (torch.tensor(z[:, 0]), torch.tensor(rho * z[:, 0] + np.sqrt(1 - rho**2) * z[:, 1]))


@pytest.mark.parametrize("seed", [0, 1])
def test_chi2_continuous_near_zero_when_independent_and_grows_with_dependence(seed):
    values = [float(chi2_kde(*_gaussian_pair(1000, rho, seed))) for rho in (0.0, 0.3, 0.6, 0.9)]

    # Exact χ² of a bivariate normal is ρ²/(1−ρ²): 0, 0.10, 0.56, 4.3; smoothing shrinks it.
    assert values[0] < 0.06 and values[0] < values[1] / 2
    assert all(a < b for a, b in zip(values, values[1:], strict=False))
    assert values[2] > 0.3


def test_chi2_binary_sensitive_near_zero_when_independent_and_grows_with_shift():
    rng = np.random.default_rng(3)
    u = rng.normal(size=2000)
    s = (rng.random(2000) < 0.4).astype(float)
    values = [float(chi2_kde(torch.tensor(u + shift * s), torch.tensor(s)))
              for shift in (0.0, 0.5, 1.0, 2.0)]

    assert values[0] < 0.01
    assert all(a < b for a, b in zip(values, values[1:], strict=False))


def _standardized(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / x.std(ddof=1)


def _chi2_integral_continuous(u: np.ndarray, s: np.ndarray, points: int = 600) -> float:
    """∫∫ p(u,s)² / (p(u) p(s)) − 1 for Gaussian product-kernel KDEs of the standardized
    pair (bandwidth n^{-1/6}), by a numpy double sum on a fine grid and trapezoid
    integration: the continuous quantity the engine's 64-point grid sum approximates."""
    n = len(u)
    u, s = _standardized(u), _standardized(s)
    h = n ** (-1 / 6)
    gu = np.linspace(u.min() - 6 * h, u.max() + 6 * h, points)
    gs = np.linspace(s.min() - 6 * h, s.max() + 6 * h, points)
    ku = norm.pdf((gu[None, :] - u[:, None]) / h) / h
    ks = norm.pdf((gs[None, :] - s[:, None]) / h) / h
    joint = ku.T @ ks / n
    ratio = joint**2 / (ku.mean(axis=0)[:, None] * ks.mean(axis=0)[None, :])
    return float(trapezoid(trapezoid(ratio, gs, axis=1), gu) - 1)


def _chi2_integral_binary(u: np.ndarray, s: np.ndarray) -> float:
    """Σ_k ∫ p(u, k)² / (p(u) P(k)) du − 1 with scipy's gaussian_kde per group (kernel
    standard deviation n^{-1/5} on the standardized prediction)."""
    n = len(u)
    u = _standardized(u)
    h = n ** (-1 / 5)
    grid = np.linspace(u.min() - 6 * h, u.max() + 6 * h, 4001)
    p_u = gaussian_kde(u, bw_method=h / u.std(ddof=1))(grid)
    total = 0.0
    for k in np.unique(s):
        part = u[s == k]
        weight = len(part) / n
        joint = weight * gaussian_kde(part, bw_method=h / part.std(ddof=1))(grid)
        total += trapezoid(joint**2 / (p_u * weight), grid)
    return float(total - 1)


@pytest.mark.parametrize("rho", [0.0, 0.3, 0.9])
def test_chi2_continuous_matches_an_independent_kde_integral(rho):
    u, s = _gaussian_pair(800, rho, 5)
    # A skewed prediction too, so the check is not specific to Gaussian margins.
    for pred in (u, torch.exp(u)):
        expected = _chi2_integral_continuous(pred.numpy(), s.numpy())
        assert float(chi2_kde(pred, s)) == pytest.approx(expected, rel=3e-3, abs=1e-4)


@pytest.mark.parametrize("shift", [0.0, 0.5, 2.0])
def test_chi2_binary_matches_scipy_gaussian_kde(shift):
    rng = np.random.default_rng(7)
    s = (rng.random(1500) < 0.4).astype(float)
    u = rng.normal(size=1500) + shift * s
    expected = _chi2_integral_binary(u, s)
    assert float(chi2_kde(torch.tensor(u), torch.tensor(s))) == pytest.approx(
        expected, rel=3e-3, abs=1e-4)


def test_chi2_is_differentiable_and_zero_for_constant_prediction():
    u, s = _gaussian_pair(200, 0.5, 0)
    u = u.clone().requires_grad_(True)
    chi2_kde(u, s).backward()
    assert torch.isfinite(u.grad).all() and u.grad.abs().sum() > 0

    assert abs(float(chi2_kde(torch.zeros(50, dtype=torch.float64), s[:50]))) < 1e-9


def test_demographic_parity_matches_numpy_for_bernoulli_and_categorical():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(40, 1))
    s = rng.integers(0, 2, size=40).astype(float)
    p = 1 / (1 + np.exp(-f[:, 0]))
    expected = abs(p[s == 1].mean() - p[s == 0].mean())

    bern = make_fairness_objective("demographic_parity", get_family("bernoulli"),
                                   torch.zeros(40, 3), torch.tensor(s))
    assert float(bern.fn(torch.tensor(f))) == pytest.approx(expected, rel=1e-12)

    # Two-class softmax with logits (0, f) gives the same P(y = 1) = σ(f).
    logits = torch.tensor(np.hstack([np.zeros_like(f), f]))
    cat = make_fairness_objective("demographic_parity", get_family("categorical"),
                                  torch.zeros(40, 3), torch.tensor(s * 5 + 2))
    assert float(cat.fn(logits)) == pytest.approx(expected, rel=1e-12)


def test_predicted_mean_and_utility_metrics():
    f = torch.tensor([[-1.0], [0.5], [2.0]], dtype=torch.float64)
    y = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)

    assert torch.allclose(predicted_mean(get_family("poisson"), f), torch.exp(f[:, 0]))
    assert accuracy(get_family("bernoulli"), f, y) == pytest.approx(2 / 3)
    assert mean_squared_error(get_family("gaussian"), f, y) == pytest.approx(
        ((np.array([-1.0, 0.5, 2.0]) - np.array([0, 0, 1.0])) ** 2).mean())
    with pytest.raises(SpecError, match="2 classes"):
        predicted_mean(get_family("categorical"), torch.zeros(3, 3))
    with pytest.raises(SpecError, match="classifier"):
        accuracy(get_family("gaussian"), f, y)


def test_mean_loss_objective_is_the_family_mean_loss():
    f = torch.tensor([[0.3], [-2.0]], dtype=torch.float64)
    y = torch.tensor([1.0, 0.0], dtype=torch.float64)
    objective = mean_loss(get_family("bernoulli"), torch.zeros(2, 4), y)
    expected = np.mean(np.log1p(np.exp(-np.array([0.3, 2.0]))))

    assert float(objective.fn(f)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("metric", "family", "sensitive", "message"),
    [
        ("demographic_parity", "bernoulli", [0.0, 1.0, 1.0], "3 values for 4 rows"),
        ("demographic_parity", "bernoulli", [0.0, 1.0, 2.0, 1.0], "exactly 2 values"),
        ("demographic_parity", "gaussian", [0.0, 1.0, 0.0, 1.0], "binary classifier"),
        ("demographic_parity", "bernoulli", [0.0, float("nan"), 0.0, 1.0], "NaN"),
        ("chi2", "gaussian", [1.0, 1.0, 1.0, 1.0], "at least 2 distinct"),
        ("parity", "bernoulli", [0.0, 1.0, 0.0, 1.0], "metric must be"),
    ],
)
def test_fairness_objective_rejects_bad_input(metric, family, sensitive, message):
    with pytest.raises(SpecError, match=message):
        make_fairness_objective(metric, get_family(family), torch.zeros(4, 2),
                                torch.tensor(sensitive))
