"""Shared pieces of the client tests: a small logistic regression with its numpy oracle."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# Arrays above this many elements come back as artifacts: small, so tests cover both paths.
INLINE_MAX = 50
N_TRAIN = 160
N_TEST = 40
C = 1.0


@dataclass
class LogReg:
    """L2 logistic regression on standardized breast_cancer rows, with its oracle pieces."""

    X: np.ndarray  # (n, d) float32 training features
    y: np.ndarray  # (n,) 0/1
    s: np.ndarray  # (n,) 0/1 sensitive group
    X_test: np.ndarray
    y_test: np.ndarray
    module: torch.nn.Sequential
    lam: float  # λ of strength·½‖w‖² (bias excluded)

    @property
    def theta(self) -> np.ndarray:
        """[w..., b] in float64, from the float32 weights the server holds."""
        lin = self.module[0]
        return np.concatenate([lin.weight.detach().double().numpy().ravel(),
                               lin.bias.detach().double().numpy()])

    @staticmethod
    def design(X: np.ndarray) -> np.ndarray:
        return np.hstack([X.astype(np.float64), np.ones((len(X), 1))])

    def probs(self, X: np.ndarray, theta: np.ndarray | None = None) -> np.ndarray:
        th = self.theta if theta is None else theta
        return 1.0 / (1.0 + np.exp(-self.design(X) @ th))

    def grads(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(m, d+1) per-row gradients of the log-loss at θ̂."""
        return (self.probs(X) - y)[:, None] * self.design(X)

    def hessian(self) -> np.ndarray:
        """(d+1, d+1) Hessian of mean loss + λ·½‖w‖² at θ̂ (equals the Fisher for a GLM)."""
        Z, p = self.design(self.X), self.probs(self.X)
        H = (Z * (p * (1 - p))[:, None]).T @ Z / len(Z)
        reg = np.full(Z.shape[1], self.lam)
        reg[-1] = 0.0
        return H + np.diag(reg)

    def loss(self, X: np.ndarray, y: np.ndarray, theta: np.ndarray | None = None) -> np.ndarray:
        p = np.clip(self.probs(X, theta), 1e-15, 1 - 1e-15)
        return -(y * np.log(p) + (1 - y) * np.log(1 - p))


@dataclass
class Registered:
    model: Any
    train: Any
    test: Any
