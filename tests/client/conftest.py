"""A real afif stack (`afif up` in a subprocess, temp data dir, free port) for client tests,
plus a small logistic-regression problem with a numpy oracle."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from client_fixtures import INLINE_MAX, N_TEST, N_TRAIN, C, LogReg, Registered
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from client import Client
from client.stack import LocalStack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    data_dir = tmp_path_factory.mktemp("afif-client")
    with LocalStack(data_dir, tenant="client-tests",
                    extra_env={"AFIF_INLINE_MAX": str(INLINE_MAX)}) as running:
        yield running


@pytest.fixture()
def client(stack: LocalStack) -> Iterator[Client]:
    with stack.client() as c:
        yield c


@pytest.fixture(scope="session")
def logreg() -> LogReg:
    data = load_breast_cancer()
    X, y = data.data, data.target.astype(np.int64)
    rng = np.random.default_rng(0)
    rows = rng.permutation(len(y))[: N_TRAIN + N_TEST]
    X = StandardScaler().fit_transform(X[rows]).astype(np.float32)
    y = y[rows]
    s = (X[:, 1] > 0).astype(np.int64)  # "mean texture" above its mean
    X_tr, y_tr, X_te, y_te = X[:N_TRAIN], y[:N_TRAIN], X[N_TRAIN:], y[N_TRAIN:]
    sk = LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(X_tr, y_tr)
    module = torch.nn.Sequential(torch.nn.Linear(X.shape[1], 1))
    with torch.no_grad():
        module[0].weight.copy_(torch.tensor(sk.coef_, dtype=torch.float32))
        module[0].bias.copy_(torch.tensor(sk.intercept_, dtype=torch.float32))
    return LogReg(X_tr, y_tr, s[:N_TRAIN], X_te, y_te, module, 1.0 / (N_TRAIN * C))


@pytest.fixture(scope="session")
def registered(stack: LocalStack, logreg: LogReg) -> Registered:
    with stack.client() as c:
        model = c.register_model(
            logreg.module, family="bernoulli", name="bc-logreg",
            regularizer={"kind": "l2", "strength": logreg.lam, "exclude": ["0.bias"]},
        )
        train = c.register_dataset(logreg.X, logreg.y, sensitive=logreg.s, name="bc-train")
        test = c.register_dataset(logreg.X_test, logreg.y_test, name="bc-test")
    return Registered(model, train, test)


@pytest.fixture(scope="session")
def failing_params() -> dict[str, object]:
    """Unlearning params that pass submission but make the engine fail the job."""
    # An option the solver does not know: the engine refuses it when the job runs.
    return {"remove": [0], "solver": "cg", "solver_options": {"no_such_option": 1}}
