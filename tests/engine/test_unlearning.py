"""Unlearning: the engine's step against dense numpy Newton steps and exact retraining."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_diabetes
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.preprocessing import StandardScaler

from engine.errors import SpecError
from engine.problem import Problem
from engine.regularizers import make_regularizer
from engine.spec import build_model
from engine.tasks import unlearn
from tests.engine import oracles
from tests.engine.task_problems import linear_problem, linear_theta

LAM = 1e-2


@pytest.fixture(scope="module")
def cancer():
    X, y = load_breast_cancer(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    theta = oracles.fit_logistic(X, y.astype(float), LAM, penalize_bias=False)
    return X, y.astype(float), theta


@pytest.fixture(scope="module")
def cancer_l1():
    X, y = load_breast_cancer(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    theta = oracles.fit_logistic_l1(X, y.astype(float), LAM)
    return X, y.astype(float), theta


def _ratio(theta_new, theta_hat, theta_retrain) -> float:
    return float(np.linalg.norm(theta_new - theta_retrain)
                 / np.linalg.norm(theta_hat - theta_retrain))


def _sklearn_retrain(X, y, keep) -> np.ndarray:
    """Retrain on the kept rows with the SUM loss at C = 1/(n λ), n the FULL row count:
    exactly the weighted objective with w_S = 0 and the 1/n kept."""
    clf = LogisticRegression(C=1.0 / (len(y) * LAM), solver="newton-cholesky", tol=1e-12,
                             max_iter=1000)
    clf.fit(X[keep], y[keep])
    return np.r_[clf.coef_[0], clf.intercept_]


@pytest.mark.parametrize("method", ["fisher", "hessian"])
@pytest.mark.parametrize("size", [1, 10, 50])
def test_logistic_step_equals_dense_newton_step(cancer, method, size):
    X, y, theta_hat = cancer
    remove = np.random.default_rng(size).choice(len(y), size, replace=False)
    _, grads, _ = oracles.logistic_per_sample(X, y, theta_hat)
    _, _, hess = oracles.logistic_objective(X, y, theta_hat, LAM, penalize_bias=False)
    expected = oracles.newton_removal_step(theta_hat, grads, hess, remove)

    problem = linear_problem(X, y, theta_hat, "bernoulli", "l2", LAM)
    got = linear_theta(unlearn(problem, remove, method=method).parameters)

    assert np.linalg.norm(got - expected) <= 1e-4 * np.linalg.norm(expected - theta_hat)


def test_ridge_step_equals_dense_step_and_one_refinement_is_exact_retraining():
    X, y = load_diabetes(return_X_y=True)
    X, y = StandardScaler().fit_transform(X), (y - y.mean()) / y.std()
    n = len(y)
    theta_hat = oracles.fit_ridge(X, y, LAM, penalize_bias=False)
    remove = np.arange(0, n, 9)
    grads, hess = oracles.ridge_grads_hessian(X, y, theta_hat, LAM, penalize_bias=False)
    dense_step = oracles.newton_removal_step(theta_hat, grads, hess, remove)
    problem = linear_problem(X, y, theta_hat, "gaussian", "l2", LAM)

    step = linear_theta(unlearn(problem, remove).parameters)
    refined = linear_theta(unlearn(problem, remove, refine_steps=1).parameters)

    # The objective is quadratic, so one Newton step with the curvature of the weighted
    # objective lands on the retrained model. sklearn's Ridge minimizes Σ r² + α‖w‖²:
    # ours (½ r², λ/2 ‖w‖², 1/n) times 2n with α = nλ.
    keep = np.setdiff1d(np.arange(n), remove)
    ridge = Ridge(alpha=n * LAM, tol=1e-12).fit(X[keep], y[keep])
    retrained = np.r_[ridge.coef_, ridge.intercept_]
    assert np.linalg.norm(step - dense_step) <= 1e-4 * np.linalg.norm(dense_step - theta_hat)
    assert _ratio(step, theta_hat, retrained) < 0.2
    assert np.linalg.norm(refined - retrained) <= 1e-6 * np.linalg.norm(retrained - theta_hat)


def test_logistic_single_points_close_to_sklearn_retraining(cancer):
    X, y, theta_hat = cancer
    problem = linear_problem(X, y, theta_hat, "bernoulli", "l2", LAM)
    # Our Newton optimum and sklearn's agree, so the retraining oracle is the same problem.
    full = _sklearn_retrain(X, y, np.arange(len(y)))
    assert np.linalg.norm(full - theta_hat) < 1e-5 * np.linalg.norm(theta_hat)

    ratios, refined = [], []
    for row in np.random.default_rng(0).choice(len(y), 20, replace=False):
        keep = np.setdiff1d(np.arange(len(y)), [row])
        retrained = _sklearn_retrain(X, y, keep)
        got = linear_theta(unlearn(problem, [row]).parameters)
        ratios.append(_ratio(got, theta_hat, retrained))
        got = linear_theta(unlearn(problem, [row], refine_steps=1).parameters)
        refined.append(_ratio(got, theta_hat, retrained))
    ratios, refined = np.array(ratios), np.array(refined)
    print(f"\nsingle-point error ratios: median {np.median(ratios):.4f}, max {ratios.max():.4f}; "
          f"refine_steps=1: median {np.median(refined):.2e}, max {refined.max():.2e}")

    # The plain one-step ratio is reported honestly: over all 569 rows (numpy oracle)
    # median 0.003, 90% below 0.05, a few high-leverage rows up to 0.6 (the step uses
    # the curvature with the removed row still in it; see the Limitation in unlearn).
    assert np.median(ratios) <= 0.01
    assert np.mean(ratios <= 0.05) >= 0.8
    # One refinement step (curvature of the weighted objective) meets the 0.05
    # bound for every sampled single point, high-leverage rows included.
    assert refined.max() <= 0.05


@pytest.mark.parametrize("size", [10, 50])
def test_logistic_many_points_error_ratio_and_refinement(cancer, size):
    X, y, theta_hat = cancer
    remove = np.random.default_rng(size).choice(len(y), size, replace=False)
    weights = np.ones(len(y))
    weights[remove] = 0.0
    retrained = oracles.fit_logistic(X, y, LAM, weights, penalize_bias=False, theta0=theta_hat)
    problem = linear_problem(X, y, theta_hat, "bernoulli", "l2", LAM)

    plain = unlearn(problem, remove)
    refined = unlearn(problem, remove, refine_steps=2)
    ratio = _ratio(linear_theta(plain.parameters), theta_hat, retrained)
    ratio_refined = _ratio(linear_theta(refined.parameters), theta_hat, retrained)
    print(f"\n{size} removed: error ratio {ratio:.4f}, after 2 refine steps {ratio_refined:.2e}")

    assert ratio < 0.5
    assert ratio_refined <= 0.01
    history = refined.values["stationarity_history"]
    assert len(history) == 3 and history[-1] < history[0] < refined.values["stationarity_before"]
    assert plain.values["n_removed"] == size
    assert plain.values["parameter_change_norm"] == pytest.approx(
        np.linalg.norm(linear_theta(plain.parameters) - theta_hat), rel=1e-9)


def test_scope_leaves_frozen_parameters_untouched_and_steps_the_last_layer():
    X, y = load_breast_cancer(return_X_y=True)
    X, y = StandardScaler().fit_transform(X)[:, :8], y.astype(float)
    torch.manual_seed(0)
    model = build_model({"layers": [{"type": "linear", "in_features": 8, "out_features": 6},
                                    {"type": "tanh"},
                                    {"type": "linear", "in_features": 6, "out_features": 1}]},
                        dtype=torch.float64)
    W1, b1 = model[0].weight.detach().numpy(), model[0].bias.detach().numpy()
    features = np.tanh(X @ W1.T + b1)
    # With only the last layer in scope, the model is logistic regression on fixed features.
    theta_hat = oracles.fit_logistic(features, y, LAM, penalize_bias=True)
    with torch.no_grad():
        model[2].weight.copy_(torch.as_tensor(theta_hat[:-1])[None])
        model[2].bias.copy_(torch.as_tensor(theta_hat[-1:]))
    problem = Problem(model, "bernoulli", make_regularizer("l2", LAM), X, y,
                      scope=["2.weight", "2.bias"], device="cpu")
    remove = [3, 30, 300]

    state = unlearn(problem, remove).parameters
    _, grads, _ = oracles.logistic_per_sample(features, y, theta_hat)
    _, _, hess = oracles.logistic_objective(features, y, theta_hat, LAM)
    expected = oracles.newton_removal_step(theta_hat, grads, hess, remove)

    assert set(state) == set(model.state_dict())
    assert torch.equal(state["0.weight"], model[0].weight.detach())
    assert torch.equal(state["0.bias"], model[0].bias.detach())
    got = np.r_[state["2.weight"].reshape(-1).numpy(), state["2.bias"].numpy()]
    assert np.linalg.norm(got - expected) <= 1e-6 * np.linalg.norm(expected - theta_hat)


def test_l1_optimum_is_a_fixed_point(cancer_l1):
    X, y, theta_hat = cancer_l1
    problem = linear_problem(X, y, theta_hat, "bernoulli", "l1", LAM)

    result = unlearn(problem, [])

    got = linear_theta(result.parameters)
    assert np.max(np.abs(got - theta_hat)) < 1e-8
    assert np.array_equal(got == 0, theta_hat == 0)
    assert result.values["proximal"] is True


def test_elastic_net_optimum_is_a_fixed_point(cancer):
    X, y, _ = cancer
    theta_hat = oracles.fit_logistic_l1(X, y, LAM, l1_ratio=0.5)
    model = linear_problem(X, y, theta_hat, "bernoulli", "l2", LAM).model
    problem = Problem(model, "bernoulli",
                      make_regularizer("elastic_net", LAM, exclude=["0.bias"], l1_ratio=0.5),
                      X, y, device="cpu")

    got = linear_theta(unlearn(problem, []).parameters)

    assert np.max(np.abs(got - theta_hat)) < 1e-8


def test_l1_removal_matches_numpy_prox_newton_and_retrained_zero_pattern(cancer_l1):
    X, y, theta_hat = cancer_l1
    remove = np.random.default_rng(7).choice(len(y), 10, replace=False)
    weights = np.ones(len(y))
    weights[remove] = 0.0
    retrained = oracles.fit_logistic_l1(X, y, LAM, weights, theta0=theta_hat)
    numpy_step = oracles.prox_newton_removal(X, y, theta_hat, LAM, remove)
    problem = linear_problem(X, y, theta_hat, "bernoulli", "l1", LAM)

    got = linear_theta(unlearn(problem, remove).parameters)

    err_engine = np.linalg.norm(got - retrained)
    err_numpy = np.linalg.norm(numpy_step - retrained)
    assert err_engine <= err_numpy * (1 + 1e-6) + 1e-10
    assert err_engine < 0.2 * np.linalg.norm(theta_hat - retrained)
    assert np.mean((got == 0) == (retrained == 0)) >= 0.95


def test_solvers_agree_through_the_task(cancer):
    X, y, _ = cancer
    lam = 0.1  # well conditioned, so LiSSA converges in a modest depth
    theta_hat = oracles.fit_logistic(X, y, lam, penalize_bias=True)
    problem = linear_problem(X, y, theta_hat, "bernoulli", "l2", lam, penalize_bias=True)
    remove = np.arange(0, 40)

    exact = linear_theta(unlearn(problem, remove, solver="exact").parameters) - theta_hat
    cg = linear_theta(unlearn(problem, remove, solver="cg",
                              solver_options={"tol": 1e-10}).parameters) - theta_hat
    lissa = unlearn(problem, remove, solver="lissa",
                    solver_options={"depth": 250, "batch_size": len(y), "repeats": 1})
    lissa_step = linear_theta(lissa.parameters) - theta_hat

    assert np.linalg.norm(cg - exact) <= 1e-6 * np.linalg.norm(exact)
    assert np.linalg.norm(lissa_step - exact) <= 1e-2 * np.linalg.norm(exact)
    assert lissa.values["curvature"]["solves"][0]["solver"] == "lissa"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"remove": [0, 1000]}, "outside"),
        ({"remove": [2, 2]}, "repeats"),
        ({"remove": [0.5]}, "integer"),
        ({"remove": [[1, 2]]}, "flat list"),
        ({"remove": [1], "refine_steps": -1}, "refine_steps"),
        ({"remove": [1], "method": "newton"}, "method"),
        ({"remove": [1], "solver_options": {"damping": -1.0}}, "damping"),
        ({"remove": [1], "solver": "magic"}, "solver"),
    ],
)
def test_bad_requests_raise_typed_errors(cancer, kwargs, message):
    X, y, theta_hat = cancer
    problem = linear_problem(X, y, theta_hat, "bernoulli", "l2", LAM)
    with pytest.raises(SpecError, match=message):
        unlearn(problem, **kwargs)


def test_hessian_with_non_smooth_penalty_is_refused(cancer_l1):
    X, y, theta_hat = cancer_l1
    problem = linear_problem(X, y, theta_hat, "bernoulli", "l1", LAM)
    with pytest.raises(SpecError, match="fisher"):
        unlearn(problem, [1], method="hessian")


def test_convergence_is_reported_at_the_top_level_and_warned(cancer, caplog):
    X, y, theta_hat = cancer
    problem = linear_problem(X, y, theta_hat, "bernoulli", "l2", LAM)
    remove = [1, 2, 3]

    good = unlearn(problem, remove, solver="cg", solver_options={"tol": 1e-10})
    with caplog.at_level("WARNING", logger="engine.tasks"):
        short = unlearn(problem, remove, solver="cg", solver_options={"max_iter": 2})

    # The residual is checked against numpy: C from the dense oracle, x = θ̃ − θ̂.
    _, _, hess = oracles.logistic_objective(X, y, theta_hat, LAM, penalize_bias=False)
    _, grads, _ = oracles.logistic_per_sample(X, y, theta_hat)
    rhs = grads[remove].sum(axis=0) / len(y)
    step = linear_theta(short.parameters) - theta_hat
    residual = np.linalg.norm(hess @ step - rhs) / np.linalg.norm(rhs)
    assert good.values["converged"] is True
    assert good.values["max_relative_residual"] <= 1e-9
    assert short.values["converged"] is False
    assert short.values["max_relative_residual"] == pytest.approx(residual, rel=1e-6)
    assert residual > 1e-3
    assert any("did not converge" in r.getMessage() for r in caplog.records)


def test_a_model_away_from_its_minimizer_is_flagged(cancer):
    """Influence linearizes at a minimizer: an optimum passes quietly, a half-trained
    checkpoint (the optimum pushed by a numpy-chosen offset) gets a warning with its
    gradient norm, which must equal the numpy gradient of the objective there."""
    X, y, theta = cancer
    at_optimum = unlearn(linear_problem(X, y, theta, "bernoulli", "l2", LAM), [3])
    assert at_optimum.values["warnings"] == []
    assert at_optimum.values["stationarity_ratio"] < 1e-6

    moved = theta + 0.5 * np.random.default_rng(0).standard_normal(theta.shape)
    result = unlearn(linear_problem(X, y, moved, "bernoulli", "l2", LAM), [3])
    p = 1.0 / (1.0 + np.exp(-(X @ moved[:-1] + moved[-1])))
    grad = np.r_[X.T @ (p - y) / len(y) + LAM * moved[:-1], np.mean(p - y)]
    assert result.values["stationarity"] == pytest.approx(np.linalg.norm(grad), rel=1e-6)
    assert len(result.values["warnings"]) == 1
    assert "not at a minimizer" in result.values["warnings"][0]
