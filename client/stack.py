"""Start a throwaway local afif stack (`afif up` in a subprocess) for demos and tests.

`LocalStack` picks a free port and a data folder, runs `afif up`, waits for /readyz,
creates an API key with `afif keys create`, and stops everything on exit.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO

import httpx

from client.api import Client

logger = logging.getLogger(__name__)

# Seconds to wait for /readyz after `afif up` starts (migrations + embedded Redis).
READY_TIMEOUT_S = 90.0
# Seconds between SIGTERM and SIGKILL when stopping the stack.
STOP_GRACE_S = 20.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _afif_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "service.cli", *args]


class LocalStack:
    """`with LocalStack() as stack:` gives `stack.url`, `stack.key` and `stack.client()`.

    `data_dir=None` uses a temporary folder removed on exit. The stack's log goes to
    `<data_dir>/afif-up.log`; its tail is shown if the stack fails to start.
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        *,
        tenant: str = "demo",
        workers: int = 1,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="afif-")
            data_dir = self._tmp.name
        self.data_dir = Path(data_dir).resolve()
        self.tenant = tenant
        self.workers = workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = ""
        self.env = dict(os.environ, AFIF_DATA_DIR=str(self.data_dir), **(extra_env or {}))
        # The stack must own its database and Redis, whatever the caller's shell set.
        for name in ("DATABASE_URL", "REDIS_URL"):
            if extra_env is None or name not in extra_env:
                self.env.pop(name, None)
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "afif-up.log"

    def start(self) -> LocalStack:
        """Run `afif up`, wait until ready, create a key. Raises RuntimeError on failure."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._process = subprocess.Popen(
            _afif_command("up", "--port", str(self.port), "--workers", str(self.workers)),
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        logger.info("afif up pid %d on %s, data in %s", self._process.pid, self.url,
                    self.data_dir)
        try:
            self._wait_ready()
            self.key = self.create_key(self.tenant)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        assert self._process is not None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"afif up exited with code {self._process.returncode}:\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"afif up not ready after {READY_TIMEOUT_S:.0f}s:\n{self.log_tail()}")

    def create_key(self, tenant: str) -> str:
        """`afif keys create --tenant NAME` against this stack's data; the key it printed."""
        done = subprocess.run(
            _afif_command("keys", "create", "--tenant", tenant),
            env=self.env, capture_output=True, text=True, timeout=120,
        )
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"afif keys create failed ({done.returncode}): {done.stderr}")
        return lines[-1].strip()

    def client(self, key: str | None = None, **kwargs: object) -> Client:
        """A `Client` for this stack (this stack's key unless another is given)."""
        return Client(self.url, key or self.key, **kwargs)  # type: ignore[arg-type]

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM the stack's process group, SIGKILL it after a grace period."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                logger.warning("afif up did not stop in %.0fs; killing it", STOP_GRACE_S)
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
