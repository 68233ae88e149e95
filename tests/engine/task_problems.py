"""Engine problems at optima found by the independent oracles (tests of engine tasks)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from engine.problem import Problem
from engine.regularizers import make_regularizer
from engine.spec import build_model
from tests.engine import oracles
from tests.engine.oracles import TinyMLP


def linear_problem(X: np.ndarray, y: np.ndarray, theta: np.ndarray, family: str, kind: str,
                   lam: float, penalize_bias: bool = False) -> Problem:
    """A one-layer model holding θ = (w, b) from an oracle, float64."""
    model = build_model({"layers": [{"type": "linear", "in_features": X.shape[1],
                                     "out_features": 1}]}, dtype=torch.float64)
    with torch.no_grad():
        model[0].weight.copy_(torch.as_tensor(theta[:-1])[None])
        model[0].bias.copy_(torch.as_tensor(theta[-1:]))
    exclude: Sequence[str] = () if penalize_bias else ("0.bias",)
    reg = make_regularizer(kind, lam, exclude=exclude)
    return Problem(model, family, reg, X, y, batch_size=256, device="cpu")


def linear_theta(state: dict[str, torch.Tensor]) -> np.ndarray:
    """θ = (w, b) from a one-layer state dict."""
    return np.r_[state["0.weight"].reshape(-1).numpy(), state["0.bias"].numpy()]


def mlp_problem(oracle: TinyMLP, theta: np.ndarray, activation: str = "tanh") -> Problem:
    """The engine twin of an oracle MLP (l2 on every parameter, bernoulli)."""
    model = build_model({"layers": [
        {"type": "linear", "in_features": oracle.d, "out_features": oracle.hidden},
        {"type": activation},
        {"type": "linear", "in_features": oracle.hidden, "out_features": 1},
    ]}, dtype=torch.float64)
    model.load_state_dict(oracle.state_dict(theta))
    return Problem(model, "bernoulli", make_regularizer("l2", oracle.lam),
                   oracle.X.numpy(), oracle.y.numpy(), batch_size=512, device="cpu")


def cancer_logistic_split(n_train: int, lam: float) -> tuple[np.ndarray, ...]:
    """Standardized breast_cancer split by a seeded permutation into n_train training rows
    and the rest held out, with the L2 logistic optimum (unpenalized intercept) on the
    training rows from the oracle: (X, y, X_test, y_test, θ̂)."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.preprocessing import StandardScaler

    X, y = load_breast_cancer(return_X_y=True)
    X, y = StandardScaler().fit_transform(X), y.astype(float)
    order = np.random.default_rng(0).permutation(len(y))
    train, test = order[:n_train], order[n_train:]
    theta = oracles.fit_logistic(X[train], y[train], lam, penalize_bias=False)
    return X[train], y[train], X[test], y[test], theta
