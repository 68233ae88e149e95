"""The `afif` command's own behaviour: migrate, keys, a reconcile pass, argument errors
and the hand-off of client subcommands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from service.cli import CLIENT_COMMANDS, build_parser
from tests.integration.stack import REPO, afif, stack_env

pytestmark = pytest.mark.integration


def test_migrate_keys_and_one_reconcile_pass(tmp_path: Path) -> None:
    env = stack_env(tmp_path)
    afif("migrate", env=env)
    afif("migrate", env=env)  # idempotent

    out = afif("keys", "create", "--tenant", "dora", env=env).stdout.strip().splitlines()
    key = out[-1]
    assert key.startswith("afif_") and " " not in key
    engine = create_engine(f"sqlite:///{tmp_path / 'afif.db'}")
    with engine.connect() as connection:
        stored = connection.execute(text("SELECT key_hash FROM api_keys")).scalars().all()
    engine.dispose()
    assert len(stored) == 1 and key not in stored[0], "keys must be stored hashed"

    # A pass over an empty database starts (and stops) its own embedded Redis.
    afif("reconcile", "--once", env=env)
    assert not (tmp_path / "redis.sock").exists()


def test_bad_arguments_exit_with_usage(tmp_path: Path) -> None:
    for argv in (["up", "--workers", "-1"], ["keys", "create"], ["nonsense"]):
        done = subprocess.run(
            [sys.executable, "-m", "service.cli", *argv], cwd=REPO,
            env=stack_env(tmp_path), capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 2, (argv, done.stderr)
        assert done.stderr.strip(), argv


def test_client_subcommands_are_handed_to_the_client() -> None:
    # Listed in `afif --help`; main() hands their argv to client.cli.main untouched.
    parser = build_parser()
    for name in CLIENT_COMMANDS:
        assert parser.parse_args([name]).command == name
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "models", "--help"], cwd=REPO,
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0 and "usage" in done.stdout.lower()
