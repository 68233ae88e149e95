"""Helpers of the end-to-end tests: a real stack (`afif up`: embedded Redis, API, worker
processes, reconciler) on a random port with a temporary AFIF_DATA_DIR, the data and
scikit-learn fits that serve as oracle, and HTTP shortcuts."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_SECONDS = 90.0
# Fast beats so a killed worker's job is found within seconds, not minutes.
FAST_ENV = {
    "AFIF_HEARTBEAT_SECONDS": "0.5",
    "AFIF_STALE_AFTER_SECONDS": "4",
    "AFIF_MAX_ATTEMPTS": "3",
    # Small, so that result arrays of a few hundred rows exercise the artifact path.
    "AFIF_INLINE_MAX": "100",
    "OMP_NUM_THREADS": "1",
    "AFIF_LOG_LEVEL": "INFO",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def afif(*args: str, env: dict[str, str], timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run one `afif` subcommand to completion; raises with its output if it fails."""
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )
    if done.returncode != 0:
        raise AssertionError(f"afif {' '.join(args)} exited {done.returncode}:\n{done.stderr}")
    return done


@dataclass
class Stack:
    """One `afif up` process tree; `restart()` keeps the data directory."""

    data_dir: Path
    env: dict[str, str]
    workers: int = 2
    port: int = 0
    process: subprocess.Popen | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.data_dir / "up.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.port = free_port()
        log = open(self.log_path, "a")
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "service.cli", "up", "--port", str(self.port),
                "--workers", str(self.workers), "--devices", "cpu",
                "--reconcile-interval", "0.5",
            ],
            cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"afif up exited early:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"afif up not ready in {START_TIMEOUT_SECONDS} s:\n{self.log()}")

    def stop(self) -> int:
        """SIGTERM `afif up` and wait; returns its exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"afif up ignored SIGTERM:\n{self.log()}") from None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text()[-8000:] if self.log_path.exists() else ""

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )

    def create_key(self, tenant: str) -> str:
        out = afif("keys", "create", "--tenant", tenant, env=self.env).stdout
        return out.strip().splitlines()[-1]


@contextlib.contextmanager
def running_stack(data_dir: Path, env: dict[str, str]) -> Iterator[Stack]:
    """Start `afif up`, yield it, and check that it stops cleanly on SIGTERM."""
    running = Stack(data_dir=data_dir, env=env)
    running.start()
    try:
        yield running
    finally:
        if running.process is not None and running.process.poll() is None:
            code = running.stop()
            assert code == 0, f"afif up exited {code} on SIGTERM:\n{running.log()}"


def stack_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(FAST_ENV, AFIF_DATA_DIR=str(data_dir), **extra)
    return env


# ---- data and a model fitted by scikit-learn (the oracle) ------------------------------

C = 1.0  # sklearn's inverse regularization; λ = 1/(n·C) in the engine's objective


@dataclass
class Fitted:
    """Standardized breast_cancer, a sensitive bit, and sklearn's fit on all rows."""

    X: np.ndarray  # (n, 30) float32
    y: np.ndarray  # (n,) 0/1
    sensitive: np.ndarray  # (n,) 0/1
    X_test: np.ndarray
    y_test: np.ndarray
    coef: np.ndarray  # (30,)
    intercept: float

    @property
    def n(self) -> int:
        return len(self.y)

    @property
    def strength(self) -> float:
        return 1.0 / (self.n * C)


def fit_logreg(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Exact minimizer of C·Σ log-loss + ½‖w‖² (intercept unpenalized), float64."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=C, tol=1e-12, max_iter=10_000)
    model.fit(X.astype(np.float64), y)
    return model.coef_.ravel().copy(), float(model.intercept_[0])


def make_fitted() -> Fitted:
    """Standardized breast_cancer split 400/169 and sklearn's fit on the 400."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    X = data.data
    X = ((X - X.mean(0)) / X.std(0)).astype(np.float32)
    y = data.target.astype(np.int64)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    train, test = order[:400], order[400:]
    # A sensitive attribute correlated with the label, so parity is not trivially zero.
    sensitive = (X[:, 0] > np.median(X[:, 0])).astype(np.int64)
    coef, intercept = fit_logreg(X[train], y[train])
    return Fitted(
        X=X[train], y=y[train], sensitive=sensitive[train],
        X_test=X[test], y_test=y[test], coef=coef, intercept=intercept,
    )


def safetensors_bytes(coef: np.ndarray, intercept: float) -> bytes:
    import torch
    from safetensors.torch import save

    return save({
        "0.weight": torch.tensor(coef, dtype=torch.float32).reshape(1, -1),
        "0.bias": torch.tensor([intercept], dtype=torch.float32),
    })


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def upload_model(client: httpx.Client, fitted: Fitted, name: str = "logreg") -> dict[str, Any]:
    spec = {
        "name": name,
        "architecture": {"layers": [{"type": "linear", "in_features": 30, "out_features": 1}]},
        "family": "bernoulli",
        "regularizer": {"kind": "l2", "strength": fitted.strength, "exclude": ["0.bias"]},
    }
    answer = client.post(
        "/v1/models",
        data={"spec": json.dumps(spec)},
        files={"weights": ("w.safetensors", safetensors_bytes(fitted.coef, fitted.intercept))},
    )
    assert answer.status_code == 201, answer.text
    return answer.json()


def upload_dataset(client: httpx.Client, name: str, **arrays: np.ndarray) -> dict[str, Any]:
    answer = client.post(
        "/v1/datasets",
        data={"meta": json.dumps({"name": name})},
        files={"file": (f"{name}.npz", npz_bytes(**arrays))},
    )
    assert answer.status_code == 201, answer.text
    return answer.json()


@dataclass
class Uploaded:
    model: dict[str, Any]
    train: dict[str, Any]
    test: dict[str, Any]


TERMINAL = {"succeeded", "failed", "cancelled"}

# A real job slow enough (seconds) to cancel or kill mid-run: a full-batch LiSSA series on
# the exact Hessian, one Hessian-vector product per term; it converges, so left alone the
# job succeeds.
SLOW_PARAMS: dict[str, Any] = {
    "remove": [0, 1, 2],
    "method": "hessian",
    "solver": "lissa",
    "solver_options": {"depth": 400, "repeats": 1, "batch_size": 400, "check_every": 0},
}

# Far too long to finish while a test cancels or signals its worker: with tol 0 LiSSA never
# stops early, so it would run all 10⁷ terms. Tests cancel it once it has shown what they
# need, so a cancel can never race with the job's own end.
ENDLESS_PARAMS: dict[str, Any] = {
    **SLOW_PARAMS,
    "solver_options": {**SLOW_PARAMS["solver_options"], "depth": 10_000_000, "tol": 0.0},
}


def submit(
    client: httpx.Client,
    kind: str,
    uploaded: Uploaded,
    headers: dict[str, str] | None = None,
    **params: Any,
) -> dict[str, Any]:
    body = {
        "kind": kind,
        "model_id": uploaded.model["id"],
        "dataset_id": uploaded.train["id"],
        "params": params,
    }
    answer = client.post("/v1/jobs", json=body, headers=headers or {})
    assert answer.status_code == 202, answer.text
    assert answer.headers["location"] == f"/v1/jobs/{answer.json()['id']}"
    return answer.json()


def wait_http(url: str, timeout: float = 60.0) -> None:
    """Wait until GET url/readyz answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready after {timeout} s")


def wait_for(client: httpx.Client, job_id: str, statuses: set[str] = TERMINAL,
             timeout: float = 90.0) -> dict[str, Any]:
    """Poll a job until its status is in `statuses`; fails with the job on timeout."""
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {job.get('status')} after {timeout} s: {job}")


def result_of(client: httpx.Client, job_id: str) -> dict[str, Any]:
    """The result of a job once it succeeded, checked against the kind's result schema."""
    from service.schemas import RESULT_BY_KIND

    job = wait_for(client, job_id)
    assert job["status"] == "succeeded", job
    answer = client.get(f"/v1/jobs/{job_id}/result")
    assert answer.status_code == 200, answer.text
    RESULT_BY_KIND[job["kind"]].model_validate(answer.json())
    return answer.json()


def fetch_array(client: httpx.Client, value: Any) -> np.ndarray:
    """An inline list, or an artifact reference downloaded as .npy (no pickles)."""
    if isinstance(value, dict) and "artifact" in value:
        answer = client.get(value["artifact"])
        assert answer.status_code == 200, answer.text
        array = np.load(io.BytesIO(answer.content), allow_pickle=False)
        assert list(array.shape) == value["shape"]
        return array
    return np.asarray(value)


# ---- oracles ------------------------------------------------------------------------------


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def log_loss(X: np.ndarray, y: np.ndarray, coef: np.ndarray, intercept: float) -> float:
    """Mean Bernoulli negative log-likelihood, float64."""
    z = X.astype(np.float64) @ coef + intercept
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def download_weights(client: httpx.Client, model_id: str) -> tuple[np.ndarray, float]:
    from safetensors.numpy import load

    answer = client.get(f"/v1/models/{model_id}/weights")
    assert answer.status_code == 200, answer.text
    tensors = load(answer.content)
    return tensors["0.weight"].astype(np.float64).ravel(), float(tensors["0.bias"][0])


def distance(a: tuple[np.ndarray, float], b: tuple[np.ndarray, float]) -> float:
    return float(np.linalg.norm(np.append(a[0] - b[0], a[1] - b[1])))


def influence_step(fitted: Fitted, remove: list[int]) -> tuple[np.ndarray, float]:
    """θ̂ + (1/n) C⁻¹ Σ_{i∈S} g_i with C the full regularized Hessian at θ̂, numpy float64."""
    n = fitted.n
    X = np.hstack([fitted.X.astype(np.float64), np.ones((n, 1))])
    theta = np.append(fitted.coef, fitted.intercept)
    p = sigmoid(X @ theta)
    penalty = np.diag(np.append(np.full(X.shape[1] - 1, fitted.strength), 0.0))
    curvature = (X.T * (p * (1 - p))) @ X / n + penalty
    removed_gradients = ((p - fitted.y)[:, None] * X)[remove].sum(0)
    step = np.linalg.solve(curvature, removed_gradients) / n
    return (theta + step)[:-1], float((theta + step)[-1])
