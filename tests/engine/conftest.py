"""Small problems shared by the engine-core tests (float64, scikit-learn datasets)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris, load_wine
from sklearn.preprocessing import StandardScaler

from engine.problem import Problem
from engine.regularizers import make_regularizer
from engine.spec import build_model

# Tiny models on a shared 2-core machine: a second intra-op thread only adds OpenMP
# contention (measured 20-50x slower per product when other processes are busy).
torch.set_num_threads(1)


def _standardized(X: np.ndarray) -> np.ndarray:
    return StandardScaler().fit_transform(X)


@pytest.fixture(scope="session")
def cancer() -> tuple[np.ndarray, np.ndarray]:
    """breast_cancer, standardized: X (569, 30), y in {0, 1}."""
    X, y = load_breast_cancer(return_X_y=True)
    return _standardized(X), y.astype(np.float64)


@pytest.fixture(scope="session")
def wine() -> tuple[np.ndarray, np.ndarray]:
    """wine, standardized: X (178, 13), y in {0, 1, 2}."""
    X, y = load_wine(return_X_y=True)
    return _standardized(X), y


@pytest.fixture(scope="session")
def iris() -> tuple[np.ndarray, np.ndarray]:
    """iris, standardized: X (150, 4), y in {0, 1, 2}."""
    X, y = load_iris(return_X_y=True)
    return _standardized(X), y


@pytest.fixture(scope="session")
def diabetes() -> tuple[np.ndarray, np.ndarray]:
    """diabetes, standardized X (442, 10) and standardized target."""
    X, y = load_diabetes(return_X_y=True)
    return _standardized(X), (y - y.mean()) / y.std()


def linear_model(d_in: int, d_out: int, dtype: torch.dtype = torch.float64,
                 seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return build_model({"layers": [{"type": "linear", "in_features": d_in,
                                    "out_features": d_out}]}, dtype=dtype)


def mlp(d_in: int, hidden: int, d_out: int, activation: str = "tanh",
        dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return build_model({"layers": [
        {"type": "linear", "in_features": d_in, "out_features": hidden},
        {"type": activation},
        {"type": "linear", "in_features": hidden, "out_features": d_out},
    ]}, dtype=dtype)


@pytest.fixture()
def logistic(cancer: tuple[np.ndarray, np.ndarray]) -> Problem:
    """L2 logistic regression on breast_cancer at a random (not optimal) θ, float64."""
    X, y = cancer
    reg = make_regularizer("l2", 1e-2)
    return Problem(linear_model(30, 1), "bernoulli", reg, X, y, batch_size=200, device="cpu")


@pytest.fixture()
def tanh_mlp(wine: tuple[np.ndarray, np.ndarray]) -> Problem:
    """A 13→8→3 tanh MLP on wine at a random θ (Hessian indefinite there), float64."""
    X, y = wine
    reg = make_regularizer("l2", 1e-3)
    return Problem(mlp(13, 8, 3), "categorical", reg, X, y, batch_size=64, device="cpu")


@pytest.fixture(scope="session")
def make_mlp():  # noqa: ANN201 - returns the builder above
    """The `mlp(d_in, hidden, d_out, activation, dtype, seed)` builder."""
    return mlp


@pytest.fixture(scope="session")
def make_linear():  # noqa: ANN201
    """The `linear_model(d_in, d_out, dtype, seed)` builder."""
    return linear_model
