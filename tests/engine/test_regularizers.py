"""Penalties: values, gradients and prox steps against numpy / scipy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from engine.errors import SpecError
from engine.regularizers import make_regularizer

RNG = np.random.default_rng(0)
PARAMS_NP = {"0.weight": RNG.normal(size=(3, 4)), "0.bias": RNG.normal(size=3),
             "2.weight": RNG.normal(size=(1, 3)) * 0.1}
PARAMS = {k: torch.tensor(v) for k, v in PARAMS_NP.items()}


def _numpy_value(kind: str, lam: float, exclude: set[str], alpha: float = 0.5) -> float:
    vals = [v.ravel() for k, v in PARAMS_NP.items() if k not in exclude]
    if kind == "l2":
        return lam * 0.5 * sum(float(v @ v) for v in vals)
    if kind == "l1":
        return lam * sum(float(np.abs(v).sum()) for v in vals)
    if kind == "elastic_net":
        return lam * sum(alpha * float(np.abs(v).sum()) + (1 - alpha) * 0.5 * float(v @ v)
                         for v in vals)
    if kind == "group_lasso":
        return lam * sum(float(np.linalg.norm(v)) for v in vals)
    return 0.0


@pytest.mark.parametrize("kind", ["none", "l2", "l1", "elastic_net", "group_lasso"])
@pytest.mark.parametrize("exclude", [(), ("0.bias",)])
def test_value_matches_numpy(kind: str, exclude: tuple[str, ...]) -> None:
    reg = make_regularizer(kind, 0.3, exclude=exclude, l1_ratio=0.25)
    expected = _numpy_value(kind, 0.3 if kind != "none" else 0.0, set(exclude), alpha=0.25)
    assert float(reg.value(PARAMS)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("kind", ["l2", "elastic_net"])
def test_smooth_gradient_and_curvature(kind: str) -> None:
    reg = make_regularizer(kind, 0.3, exclude=["0.bias"], l1_ratio=0.25)
    c = 0.3 if kind == "l2" else 0.3 * 0.75
    grad = reg.grad(PARAMS)
    hv = reg.hvp(PARAMS, {k: torch.ones_like(v) for k, v in PARAMS.items()})
    torch.testing.assert_close(grad["0.weight"], c * PARAMS["0.weight"])
    torch.testing.assert_close(grad["0.bias"], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(hv["2.weight"], torch.full((1, 3), c, dtype=torch.float64))
    assert reg.curvature_diag("0.bias") == 0.0 and reg.curvature_diag("0.weight") == c
    assert reg.smooth == (kind == "l2")


def _scipy_prox(kind: str, lam: float, t: float, alpha: float = 0.5) -> np.ndarray:
    """argmin_x ½‖x − θ‖² + t·λπ(x) for the single tensor 0.weight, numerically.

    l1 parts are split as x = a − b with a, b ≥ 0 so the problem is smooth and bounded.
    """
    theta = PARAMS_NP["0.weight"].ravel()
    d = theta.size
    if kind == "group_lasso":
        def obj(x: np.ndarray) -> float:
            return 0.5 * float((x - theta) @ (x - theta)) + t * lam * float(np.linalg.norm(x))
        return minimize(obj, theta, method="Nelder-Mead" if d < 3 else "BFGS",
                        options={"gtol": 1e-12}).x
    l1 = {"l1": lam, "l2": 0.0, "elastic_net": lam * alpha}[kind]
    l2 = {"l1": 0.0, "l2": lam, "elastic_net": lam * (1 - alpha)}[kind]

    def split(z: np.ndarray) -> tuple[float, np.ndarray]:
        x = z[:d] - z[d:]
        val = 0.5 * (x - theta) @ (x - theta) + t * l1 * z.sum() + t * l2 * 0.5 * x @ x
        gx = (x - theta) + t * l2 * x
        return float(val), np.concatenate([gx + t * l1, -gx + t * l1])

    z0 = np.concatenate([np.maximum(theta, 0), np.maximum(-theta, 0)])
    res = minimize(split, z0, jac=True, method="L-BFGS-B", bounds=[(0, None)] * (2 * d),
                   options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10_000})
    return res.x[:d] - res.x[d:]


@pytest.mark.parametrize("kind", ["l1", "l2", "elastic_net", "group_lasso"])
def test_prox_matches_scipy(kind: str) -> None:
    reg = make_regularizer(kind, 0.8, l1_ratio=0.5)
    out = reg.prox({"0.weight": PARAMS["0.weight"]}, t=0.7)["0.weight"].numpy().ravel()
    np.testing.assert_allclose(out, _scipy_prox(kind, 0.8, 0.7), atol=1e-6)


def test_l1_prox_is_soft_thresholding_and_respects_exclude() -> None:
    reg = make_regularizer("l1", 1.0, exclude=["0.bias"])
    out = reg.prox(PARAMS, t=0.5)
    w = PARAMS_NP["0.weight"]
    np.testing.assert_allclose(out["0.weight"].numpy(),
                               np.sign(w) * np.maximum(np.abs(w) - 0.5, 0.0))
    torch.testing.assert_close(out["0.bias"], PARAMS["0.bias"])


def test_group_lasso_custom_groups_zero_a_small_group() -> None:
    reg = make_regularizer("group_lasso", 1.0, groups=[["0.weight", "0.bias"], ["2.weight"]])
    reg.check_names(PARAMS)
    out = reg.prox(PARAMS, t=0.5)
    assert float(out["2.weight"].abs().max()) == 0.0  # ‖2.weight‖ ≈ 0.1 < 0.5
    joint = np.concatenate([PARAMS_NP["0.weight"].ravel(), PARAMS_NP["0.bias"]])
    shrink = 1 - 0.5 / np.linalg.norm(joint)
    np.testing.assert_allclose(out["0.bias"].numpy(), shrink * PARAMS_NP["0.bias"])
    expected = 1.0 * (np.linalg.norm(joint) + np.linalg.norm(PARAMS_NP["2.weight"]))
    assert float(reg.value(PARAMS)) == pytest.approx(expected)


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"kind": "l3"}, "unknown regularizer 'l3'"),
    ({"kind": "l2", "strength": -1.0}, "strength must be a finite number >= 0"),
    ({"kind": "l2", "strength": float("nan")}, "strength"),
    ({"kind": "elastic_net", "strength": 1.0, "l1_ratio": 1.5}, "l1_ratio"),
    ({"kind": "l2", "strength": 1.0, "groups": [["a"]]}, "group_lasso only"),
])
def test_bad_regularizers(kwargs: dict, fragment: str) -> None:
    with pytest.raises(SpecError, match=fragment):
        make_regularizer(**kwargs)


def test_unknown_names_are_rejected() -> None:
    reg = make_regularizer("group_lasso", 1.0, exclude=["9.bias"], groups=[["0.weight", "x"]])
    with pytest.raises(SpecError, match="9.bias, x"):
        reg.check_names(PARAMS)
