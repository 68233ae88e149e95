"""Curvature products and gradients against dense numpy algebra and autograd oracles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.operators import (
    CurvatureOperator,
    dense_matrix,
    fisher_operator,
    hessian_operator,
    loss_directional_derivatives,
    mean_gradient,
    per_sample_gradients,
    power_iteration,
)
from engine.problem import Problem
from engine.regularizers import make_regularizer
from engine.spec import build_model

VARIANTS = [("fisher", "fused"), ("fisher", "jvp_vjp"), ("hessian", "fwd_rev"),
            ("hessian", "double_backward")]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _design(problem: Problem) -> np.ndarray:
    X = problem.X.numpy()
    return np.hstack([X, np.ones((X.shape[0], 1))])  # θ order: weight then bias


def test_logistic_fisher_equals_hessian_equals_numpy(logistic: Problem) -> None:
    A = _design(logistic)
    p = _sigmoid(A @ logistic.theta().numpy())
    dense_np = A.T @ (A * (p * (1 - p))[:, None]) / A.shape[0] + 1e-2 * np.eye(A.shape[1])
    V = torch.randn(logistic.d, 3, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)

    for kind, variant in VARIANTS:
        op = CurvatureOperator(logistic, kind, variant)
        np.testing.assert_allclose(op.matvec(V).numpy(), dense_np @ V.numpy(), rtol=1e-10,
                                   atol=1e-12)
        np.testing.assert_allclose(op.matvec(V[:, 0]).numpy(), dense_np @ V[:, 0].numpy(),
                                   rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(fisher_operator(logistic).dense().numpy(), dense_np,
                               rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(hessian_operator(logistic).dense().numpy(), dense_np,
                               rtol=1e-10, atol=1e-13)


def test_glm_families_fisher_equals_hessian(diabetes: tuple, make_linear) -> None:  # noqa: ANN001
    X, y = diabetes
    counts = np.floor(np.exp(0.5 * y) * 2)  # non-negative integers for the poisson family
    for family, labels in [("gaussian", y), ("poisson", counts)]:
        problem = Problem(make_linear(10, 1), family, None, X, labels, batch_size=100)
        A = _design(problem)
        F_dense = fisher_operator(problem).dense().numpy()
        H_dense = hessian_operator(problem).dense().numpy()
        eta = A @ problem.theta().numpy()
        weight = np.ones_like(eta) if family == "gaussian" else np.exp(eta)
        np.testing.assert_allclose(F_dense, A.T @ (A * weight[:, None]) / len(A), rtol=1e-10,
                                   atol=1e-14)
        np.testing.assert_allclose(H_dense, F_dense, rtol=1e-9, atol=1e-12)


def _mlp_oracle(problem: Problem):  # noqa: ANN202
    """Hand-written 13→8→3 tanh MLP on flat θ, shared by nothing in the engine."""
    X = problem.X
    y = problem.y

    def outputs(theta: torch.Tensor) -> torch.Tensor:
        W1, b1 = theta[:104].reshape(8, 13), theta[104:112]
        W2, b2 = theta[112:136].reshape(3, 8), theta[136:139]
        return torch.tanh(X @ W1.T + b1) @ W2.T + b2

    def mean_loss(theta: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs(theta), y)

    return outputs, mean_loss


def test_mlp_hessian_and_fisher_match_autograd_oracles(tanh_mlp: Problem) -> None:
    outputs, mean_loss = _mlp_oracle(tanh_mlp)
    theta = tanh_mlp.theta()

    H_ref = torch.autograd.functional.hessian(mean_loss, theta, vectorize=True).numpy()
    J = torch.autograd.functional.jacobian(outputs, theta, vectorize=True).numpy()  # (n, K, d)
    P = torch.softmax(outputs(theta), dim=1).numpy()
    F_ref = np.zeros_like(H_ref)
    for Ji, pi in zip(J, P, strict=True):
        F_ref += Ji.T @ (np.diag(pi) - np.outer(pi, pi)) @ Ji
    F_ref /= len(J)

    F_dense = fisher_operator(tanh_mlp, regularized=False).dense().numpy()
    H_dense = hessian_operator(tanh_mlp, regularized=False).dense().numpy()
    np.testing.assert_allclose(F_dense, F_ref, atol=1e-12)
    np.testing.assert_allclose(H_dense, H_ref, atol=1e-12)
    assert np.linalg.eigvalsh(F_dense).min() > -1e-12  # PSD
    np.testing.assert_allclose(fisher_operator(tanh_mlp).diagonal().numpy(),
                               np.diag(F_ref) + 1e-3, atol=1e-12)
    assert np.linalg.eigvalsh(H_dense).min() < -1e-6  # away from the optimum: indefinite

    V = torch.randn(tanh_mlp.d, 2, generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64)
    for kind, variant in VARIANTS:
        ref = (F_ref if kind == "fisher" else H_ref) @ V.numpy() + 1e-3 * V.numpy()
        op = CurvatureOperator(tanh_mlp, kind, variant)
        np.testing.assert_allclose(op.matvec(V).numpy(), ref, atol=1e-12)  # vmapped block
        np.testing.assert_allclose(op.matvec(V[:, 1]).numpy(), ref[:, 1], atol=1e-12)
    for kind, ref in (("fisher", F_ref), ("hessian", H_ref)):
        kept = CurvatureOperator(tanh_mlp, kind, keep_graph=True)
        for _ in range(2):  # the second call reuses the kept graphs
            np.testing.assert_allclose(kept.matvec(V).numpy(),
                                       ref @ V.numpy() + 1e-3 * V.numpy(), atol=1e-12)


def test_hessian_product_matches_finite_differences(tanh_mlp: Problem) -> None:
    v = torch.randn(tanh_mlp.d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    theta, eps = tanh_mlp.theta(), 1e-5

    def grad_at(t: torch.Tensor) -> torch.Tensor:
        tanh_mlp.set_theta(t)
        return mean_gradient(tanh_mlp, regularized=True)

    fd = (grad_at(theta + eps * v) - grad_at(theta - eps * v)) / (2 * eps)
    tanh_mlp.set_theta(theta)
    hv = hessian_operator(tanh_mlp).matvec(v)
    torch.testing.assert_close(hv, fd, rtol=1e-6, atol=1e-8)


def test_gradients_match_numpy(logistic: Problem) -> None:
    A = _design(logistic)
    y = logistic.y.numpy()
    resid = _sigmoid(A @ logistic.theta().numpy()) - y
    G = A * resid[:, None]
    w = np.linspace(0.0, 2.0, len(y))

    np.testing.assert_allclose(per_sample_gradients(logistic).numpy(), G, atol=1e-12)
    np.testing.assert_allclose(mean_gradient(logistic, torch.tensor(w)).numpy(),
                               (w[:, None] * G).mean(0), atol=1e-12)
    reg_grad = 1e-2 * logistic.theta().numpy()
    np.testing.assert_allclose(mean_gradient(logistic, regularized=True).numpy(),
                               G.mean(0) + reg_grad, atol=1e-12)
    S = np.random.default_rng(0).normal(size=(logistic.d, 2))
    np.testing.assert_allclose(loss_directional_derivatives(logistic, torch.tensor(S)).numpy(),
                               G @ S, atol=1e-10)
    idx = torch.tensor([3, 5, 100])
    np.testing.assert_allclose(
        loss_directional_derivatives(logistic, torch.tensor(S[:, 0]), indices=idx).numpy(),
        G[[3, 5, 100]] @ S[:, 0], atol=1e-12)


def test_conv_residual_batchnorm_net_products(make_mlp) -> None:  # noqa: ANN001
    # Forward-mode AD must go through every layer kind a CNN uses (eval-mode batchnorm).
    torch.manual_seed(0)
    arch = {"input_shape": [2, 6, 6], "layers": [
        {"type": "conv2d", "in_channels": 2, "out_channels": 3, "kernel_size": 3,
         "padding": 1},
        {"type": "batchnorm2d", "num_features": 3},
        {"type": "selu"},
        {"type": "residual", "layers": [
            {"type": "conv2d", "in_channels": 3, "out_channels": 3, "kernel_size": 3,
             "padding": 1},
            {"type": "gelu"}]},
        {"type": "maxpool2d", "kernel_size": 2},
        {"type": "avgpool2d", "kernel_size": 3},
        {"type": "flatten"},
        {"type": "linear", "in_features": 3, "out_features": 2}]}
    model = build_model(arch, dtype=torch.float64)
    with torch.no_grad():
        model[1].running_mean.fill_(0.1)
        model[1].running_var.fill_(2.0)
    X = torch.randn(10, 2, 6, 6, dtype=torch.float64)
    problem = Problem(model, "categorical", make_regularizer("l2", 1e-2), X,
                      torch.arange(10) % 2, batch_size=4)

    dense_F = dense_matrix(CurvatureOperator(problem, "fisher", "jvp_vjp"))
    torch.testing.assert_close(fisher_operator(problem).dense(), dense_F)
    v = torch.randn(problem.d, dtype=torch.float64)
    torch.testing.assert_close(fisher_operator(problem).matvec(v), dense_F @ v)
    hv = [CurvatureOperator(problem, "hessian", var).matvec(v)
          for var in ("fwd_rev", "double_backward")]
    torch.testing.assert_close(hv[0], hv[1])
    assert torch.linalg.eigvalsh(dense_F).min() > 0  # F + λI is positive definite


def test_scope_restricts_to_a_block(tanh_mlp: Problem) -> None:
    full = fisher_operator(tanh_mlp).dense()
    last = Problem(tanh_mlp.model, "categorical", tanh_mlp.regularizer, tanh_mlp.X,
                   tanh_mlp.y, scope=["2.weight", "2.bias"])
    assert last.d == 27
    torch.testing.assert_close(fisher_operator(last).dense(), full[112:, 112:])
    g_full = mean_gradient(tanh_mlp)
    torch.testing.assert_close(mean_gradient(last), g_full[112:])


def test_minibatch_damping_and_power_iteration(logistic: Problem) -> None:
    op = fisher_operator(logistic, damping=0.5)
    dense = op.dense()
    v = torch.randn(logistic.d, dtype=torch.float64)
    whole = op.minibatch(batch_size=10_000, seed=0)  # a batch of every row
    torch.testing.assert_close(whole.matvec(v), dense @ v)
    torch.testing.assert_close(dense - fisher_operator(logistic).dense(),
                               0.5 * torch.eye(logistic.d, dtype=torch.float64))

    mini = op.minibatch(batch_size=50, seed=0)
    first, second = mini.matvec(v), mini.matvec(v)
    assert not torch.allclose(first, second)  # a fresh batch each call
    mean = sum(mini.matvec(v) for _ in range(200)) / 200
    assert float(torch.linalg.norm(mean - dense @ v) / torch.linalg.norm(dense @ v)) < 0.05

    lam = power_iteration(op, iters=500, tol=1e-10)
    assert lam == pytest.approx(float(torch.linalg.eigvalsh(dense).max()), rel=1e-6)
