"""The `afif` command: run the stack (`up`, `api`, `worker`, `reconcile`), administer it
(`migrate`, `keys create`), and, through the client, talk to a running one.

Settings come from the environment (AFIF_DATA_DIR, DATABASE_URL, REDIS_URL, ...); see
service/settings.py. Every process `afif up` starts inherits them.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

# Subcommands served by the client CLI (client/cli.py), passed through verbatim.
CLIENT_COMMANDS = ("models", "datasets", "jobs", "submit")
# Seconds `afif up` lets a busy worker finish its job after SIGTERM; then a second
# SIGTERM makes it hand the job back, and after SHUTDOWN_GRACE_SECONDS more it is killed.
WARM_STOP_SECONDS = 5.0
SHUTDOWN_GRACE_SECONDS = 15.0
# A worker that dies is restarted, but no more often than this (seconds).
WORKER_RESTART_BACKOFF_SECONDS = 2.0
LOG_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree; tests and tests/test_deploy_files.py introspect it."""
    parser = argparse.ArgumentParser(prog="afif", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("AFIF_LOG_LEVEL", "INFO"))
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="migrate, then run Redis, the API, workers, reconciler")
    _add_bind_arguments(up)
    up.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    up.add_argument(
        "--devices",
        default="auto",
        help="'auto' (one worker per visible GPU, else CPU), 'cpu', or GPU ids like 0,1",
    )
    up.add_argument(
        "--reconcile-interval", type=float, default=10.0, help="seconds between reconciler runs"
    )

    api = commands.add_parser("api", help="serve the HTTP API (uvicorn)")
    _add_bind_arguments(api)

    worker = commands.add_parser("worker", help="run one RQ worker for afif jobs")
    worker.add_argument("--name", default=None, help="worker name (default host.pid)")
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")

    commands.add_parser("migrate", help="apply database migrations")

    keys = commands.add_parser("keys", help="manage API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = key_commands.add_parser("create", help="create a key; prints it on the last line")
    create.add_argument("--tenant", required=True, help="tenant name (created if new)")

    reconcile = commands.add_parser(
        "reconcile", help="requeue or fail lost jobs, and enqueue never-enqueued ones"
    )
    reconcile.add_argument("--once", action="store_true", help="one pass, then exit")
    reconcile.add_argument("--interval", type=float, default=10.0, help="seconds between passes")

    for name in CLIENT_COMMANDS:
        passthrough = commands.add_parser(
            name, help=f"client: {name} (see `afif {name} --help`)", add_help=False
        )
        passthrough.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def _add_bind_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `afif` console script; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)

    # Client subcommands own their flags; hand them over before argparse sees them.
    if args_list and args_list[0] in CLIENT_COMMANDS:
        return _run_client(args_list)

    args = build_parser().parse_args(args_list)
    _configure_logging(args.log_level)
    handler = {
        "up": _cmd_up,
        "api": _cmd_api,
        "worker": _cmd_worker,
        "migrate": _cmd_migrate,
        "keys": _cmd_keys,
        "reconcile": _cmd_reconcile,
    }[args.command]
    return int(handler(args) or 0)


def _configure_logging(level: str) -> None:
    from workers.logcontext import JobIdFilter

    handler = logging.StreamHandler()
    handler.addFilter(JobIdFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Alembic narrates its plugin set-up at INFO on every migrate.
    logging.getLogger("alembic").setLevel(max(root.level, logging.WARNING))


def _run_client(argv: list[str]) -> int:
    try:
        from client.cli import main as client_main
    except ImportError as exc:
        print(f"afif {argv[0]}: the client package is not available ({exc})", file=sys.stderr)
        return 2
    return int(client_main(argv) or 0)


def _cmd_migrate(args: argparse.Namespace) -> int:
    from service.db import migrate
    from service.settings import get_settings

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate(settings.database_url)
    logger.info("database at head: %s", _redact(settings.database_url))
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    from service.auth import create_api_key
    from service.db import session_scope

    with session_scope() as session:
        key = create_api_key(session, args.tenant)
    print(f"created an API key for tenant {args.tenant!r}; it is shown only once:")
    print(key)
    return 0


def _cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=False,
    )
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from workers.runner import run_worker

    return run_worker(name=args.name, burst=args.burst)


def _cmd_reconcile(args: argparse.Namespace) -> int:
    from workers.reconciler import reconcile_forever, reconcile_once

    if args.once:
        summary = reconcile_once()
        logger.info("reconcile: %s", summary)
        return 0
    reconcile_forever(interval=args.interval, stop=_stop_event_on_signals())
    return 0


def _stop_event_on_signals() -> threading.Event:
    stop = threading.Event()

    def request_stop(signum: int, frame: Any) -> None:
        logger.info("received %s; shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return stop


def _cmd_up(args: argparse.Namespace) -> int:
    from service.queue import EmbeddedRedis, socket_answers
    from service.settings import get_settings
    from workers.reconciler import reconcile_forever

    if args.workers < 0:
        print("afif up: --workers must be >= 0", file=sys.stderr)
        return 2
    settings = get_settings()
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    stop = _stop_event_on_signals()

    _cmd_migrate(args)
    env = dict(os.environ, AFIF_DATA_DIR=str(data_dir), AFIF_LOG_LEVEL=args.log_level)
    redis_server: EmbeddedRedis | None = None
    if not settings.redis_url:
        redis_server = EmbeddedRedis(data_dir)
        if socket_answers(redis_server.socket_path):
            # A server left by an earlier run (or a standalone process) already serves
            # this data dir; two servers on one socket and one dump file would clash.
            logger.warning("reusing the Redis already listening on %s", redis_server.socket_path)
            url = redis_server.url
            redis_server = None
        else:
            redis_server.start()
            url = redis_server.url
        env["REDIS_URL"] = url
        # This process's own clients (the reconciler) must use the same server.
        os.environ["REDIS_URL"] = url
        get_settings.cache_clear()

    devices = _worker_devices(args.devices, args.workers)
    cpu_threads = max(1, (os.cpu_count() or 1) // max(1, devices.count("cpu")))
    children = Supervisor(env)
    try:
        children.start("api", _self_command("api", "--host", args.host, "--port", str(args.port)))
        for index, device in enumerate(devices):
            children.start(
                f"worker-{index}", _self_command("worker"), _device_env(device, cpu_threads)
            )
        reconciler = threading.Thread(
            target=reconcile_forever,
            kwargs={"interval": args.reconcile_interval, "stop": stop},
            name="reconciler",
            daemon=True,
        )
        reconciler.start()
        logger.info(
            "afif up: API on http://%s:%d, %d worker(s) on %s, data in %s",
            args.host, args.port, len(devices), ",".join(devices) or "-", data_dir,
        )

        while not stop.wait(0.5):
            if not children.check():
                logger.error("the API process exited; shutting down")
                return 1
            if redis_server is not None and not redis_server.running():
                logger.error("the embedded Redis exited; shutting down (see %s)",
                             data_dir / "redis.log")
                return 1
        return 0
    finally:
        stop.set()
        children.stop_all()
        if redis_server is not None:
            redis_server.stop()


class Supervisor:
    """Child processes of `afif up`: started in their own process group, restarted if a
    worker dies, and stopped together (SIGTERM, then SIGKILL after a grace period)."""

    # Limitation: children live in their own sessions (so a terminal's Ctrl-C reaches only
    # `afif up`, which stops them in order); if `afif up` itself is SIGKILLed they are
    # orphaned and keep running until stopped by hand.

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.children: dict[str, tuple[list[str], dict[str, str], subprocess.Popen[bytes]]] = {}
        self.last_restart: dict[str, float] = {}

    def start(self, name: str, command: list[str], extra_env: dict[str, str] | None = None) -> None:
        env = dict(self.env, **(extra_env or {}))
        process = subprocess.Popen(command, env=env, start_new_session=True)
        self.children[name] = (command, extra_env or {}, process)
        logger.info("started %s (pid %d)", name, process.pid)

    def check(self) -> bool:
        """Restart dead workers; False if the API itself has exited."""
        for name, (command, extra_env, process) in list(self.children.items()):
            code = process.poll()
            if code is None:
                continue
            if name == "api":
                return False
            since = time.monotonic() - self.last_restart.get(name, -1e9)
            if since >= WORKER_RESTART_BACKOFF_SECONDS:
                logger.warning("%s exited with code %s; restarting it", name, code)
                self.last_restart[name] = time.monotonic()
                self.start(name, command, extra_env)
        return True

    def stop_all(self) -> None:
        """SIGTERM everyone; a worker busy after WARM_STOP_SECONDS gets a second SIGTERM
        (it hands its job back to the queue); anyone left after the grace period is killed.
        """
        self._signal_all(signal.SIGTERM)
        self._wait_all(WARM_STOP_SECONDS)
        if self._signal_all(signal.SIGTERM):
            logger.info("asked busy workers to hand their jobs back")
        if not self._wait_all(SHUTDOWN_GRACE_SECONDS):
            for name, (_, _, process) in self.children.items():
                if process.poll() is None:
                    logger.warning("%s ignored SIGTERM; killing it", name)
                    process.kill()
                    process.wait()

    def _signal_all(self, signum: int) -> int:
        count = 0
        for name, (_, _, process) in self.children.items():
            if process.poll() is None:
                logger.info("sending %s to %s (pid %d)", signal.Signals(signum).name, name,
                            process.pid)
                process.send_signal(signum)
                count += 1
        return count

    def _wait_all(self, seconds: float) -> bool:
        """Wait until every child has exited or `seconds` passed; True if all exited."""
        deadline = time.monotonic() + seconds
        for _, _, process in self.children.values():
            try:
                process.wait(timeout=max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return False
        return True


def _self_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "service.cli", *arguments]


def _worker_devices(devices: str, workers: int) -> list[str]:
    """One entry per worker: a CUDA device id, or "cpu"."""
    if devices == "cpu":
        return ["cpu"] * workers
    if devices == "auto":
        gpus = [str(i) for i in range(_cuda_device_count())]
    else:
        gpus = [part.strip() for part in devices.split(",") if part.strip()]
    if not gpus:
        return ["cpu"] * workers
    return [gpus[i % len(gpus)] for i in range(workers)]


def _cuda_device_count() -> int:
    try:
        import torch

        return int(torch.cuda.device_count())
    except Exception:
        logger.warning("could not count CUDA devices; workers will use the CPU", exc_info=True)
        return 0


def _device_env(device: str, cpu_threads: int) -> dict[str, str]:
    """Environment of one worker: its GPU, or its share of the CPU cores."""
    if device != "cpu":
        return {"CUDA_VISIBLE_DEVICES": device}

    # Several CPU workers would each start one thread per core; split the cores unless
    # the operator chose a thread count.
    env = {"CUDA_VISIBLE_DEVICES": ""}
    if "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(cpu_threads)
    return env


def _redact(url: str) -> str:
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


if __name__ == "__main__":
    sys.exit(main())
