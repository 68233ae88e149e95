"""The core end-to-end job tests again, on an `afif up` stack whose database is PostgreSQL:
unlearning checked against scikit-learn refits, idempotent POST, and cancel of a running job.
The rest of tests/integration runs on SQLite (test_jobs.py) or on PostgreSQL already
(test_failover.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.conftest import PgServer
from tests.integration.stack import Stack, running_stack, stack_env

# Collected here a second time, with this module's `stack` fixture.
from tests.integration.test_jobs import (  # noqa: F401
    test_cancel_a_running_job,
    test_idempotent_post_returns_the_same_job,
    test_unlearning_one_step_and_refined,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, pg_server: PgServer
) -> Iterator[Stack]:
    """`afif up` (embedded Redis, two workers, reconciler) on a fresh PostgreSQL database."""
    name = f"stack_{uuid.uuid4().hex[:12]}"
    pg_server.execute(f"CREATE DATABASE {name}")
    data_dir = tmp_path_factory.mktemp("afif-data-pg")
    env = stack_env(data_dir, DATABASE_URL=pg_server.url(name))
    try:
        with running_stack(data_dir, env) as running:
            yield running
    finally:
        pg_server.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
