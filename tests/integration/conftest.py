"""Fixtures of the end-to-end tests: a running `afif up` stack on SQLite, two tenants,
and a scikit-learn-fitted model uploaded with its data."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.integration.stack import (
    Fitted,
    Stack,
    Uploaded,
    make_fitted,
    running_stack,
    stack_env,
    upload_dataset,
    upload_model,
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("afif-data")
    with running_stack(data_dir, stack_env(data_dir)) as running:
        yield running


@pytest.fixture(scope="module")
def alice(stack: Stack) -> Iterator[httpx.Client]:
    with stack.client(stack.create_key("alice")) as client:
        yield client


@pytest.fixture(scope="module")
def bob(stack: Stack) -> Iterator[httpx.Client]:
    with stack.client(stack.create_key("bob")) as client:
        yield client


@pytest.fixture(scope="session")
def fitted() -> Fitted:
    return make_fitted()


@pytest.fixture(scope="module")
def uploaded(alice: httpx.Client, fitted: Fitted) -> Uploaded:
    return Uploaded(
        model=upload_model(alice, fitted),
        train=upload_dataset(alice, "train", X=fitted.X, y=fitted.y, sensitive=fitted.sensitive),
        test=upload_dataset(alice, "test", X=fitted.X_test, y=fitted.y_test),
    )
