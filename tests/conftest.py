"""Shared database fixtures: every db-backed test runs on SQLite and on PostgreSQL.

- `pg_server` (session): a throwaway PostgreSQL cluster in a temp dir with its own port
  and socket dir (as the `postgres` user when running as root); skipped only when no
  server binaries exist (/usr/lib/postgresql/*/bin/initdb).
- `database_url` (function, params "sqlite" / "postgresql"): a fresh database migrated to
  head (copied from a migrated template, so it is cheap).
- `db_session`: a Session on `database_url`.
- `create_tenant_key(url, name) -> str`: a tenant and its plaintext API key.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin/initdb"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pg_bin() -> Path | None:
    found = sorted(glob.glob(PG_BIN_GLOB))
    return Path(found[-1]).parent if found else None


def _as_postgres(cmd: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


class PgServer:
    """A PostgreSQL cluster of our own: initdb, start, createdb, stop."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="afif-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sock"
        self.sockets.mkdir()
        self.port = _free_port()
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            shutil.chown(self.sockets, "postgres")
            os.chmod(self.root, 0o755)

    def _run(self, *args: str) -> None:
        subprocess.run(_as_postgres(list(args)), check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust",
                  "-U", "postgres", "--no-sync", "-E", "UTF8")
        options = (f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", options,
                  "-l", str(self.root / "server.log"), "-w", "-t", "60", "start")

    def stop(self) -> None:
        try:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                      "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def execute(self, sql: str) -> None:
        import psycopg

        for attempt in range(20):
            try:
                with psycopg.connect(
                    host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                    autocommit=True,
                ) as conn:
                    conn.execute(sql)
                return
            except psycopg.errors.ObjectInUse:
                # A template still has a connection closing; give it a moment.
                if attempt == 19:
                    raise
                time.sleep(0.1)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A running throwaway PostgreSQL cluster (skips when the binaries are absent)."""
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not installed")
    server = PgServer(bindir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from service.db import dispose_all, migrate

    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    migrate(f"sqlite:///{path}")
    dispose_all()
    return path


@pytest.fixture(scope="session")
def _pg_template(pg_server: PgServer) -> str:
    from service.db import dispose_all, migrate

    name = "afif_template"
    pg_server.execute(f"CREATE DATABASE {name}")
    migrate(pg_server.url(name))
    dispose_all()
    return name


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database at the migrations' head, on each backend in turn."""
    from service.db import dispose_all

    if request.param == "sqlite":
        template: Path = request.getfixturevalue("_sqlite_template")
        path = tmp_path / "afif.db"
        shutil.copy(template, path)
        yield f"sqlite:///{path}"
        dispose_all()
        return

    server: PgServer = request.getfixturevalue("pg_server")
    template_name: str = request.getfixturevalue("_pg_template")
    name = f"t_{uuid.uuid4().hex[:16]}"
    server.execute(f"CREATE DATABASE {name} TEMPLATE {template_name}")
    try:
        yield server.url(name)
    finally:
        dispose_all()
        server.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture()
def db_session(database_url: str) -> Iterator[object]:
    """A Session on the fresh database."""
    from service.db import session_factory

    session = session_factory(database_url)()
    try:
        yield session
    finally:
        session.close()


def create_tenant_key(database_url: str, tenant: str) -> str:
    """Create tenant `tenant` (if new) and return a new plaintext API key for it."""
    from service.auth import create_api_key
    from service.db import session_scope

    with session_scope(database_url) as session:
        return create_api_key(session, tenant)
