"""Job-submission latency and status-poll throughput of a real stack over loopback, with
the workers idle and then busy with a small job mix, side by side in one run.

Starts `afif up` (embedded Redis, API, workers, reconciler) on a random port with a
temporary AFIF_DATA_DIR and SQLite, as the integration tests do. Prints a table and
writes bench/results/api.json.

    python -m bench.bench_api [--submits 100] [--poll-seconds 5] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "api.json"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_stack(data_dir: Path, workers: int) -> tuple[subprocess.Popen, str, dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(AFIF_DATA_DIR=str(data_dir), AFIF_LOG_LEVEL="WARNING")
    port = free_port()
    log = open(data_dir / "up.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "up", "--port", str(port),
         "--workers", str(workers), "--devices", "cpu"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url, env
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"afif up did not become ready; see {data_dir / 'up.log'}")


def api_key(env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "keys", "create", "--tenant", "bench"],
        cwd=REPO, env=env, capture_output=True, text=True, check=True,
    )
    return done.stdout.strip().splitlines()[-1]


def upload(client: httpx.Client) -> dict[str, str]:
    """A logistic regression on standardized breast_cancer, its training and test sets."""
    import torch
    from safetensors.torch import save
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression

    data = load_breast_cancer()
    X = ((data.data - data.data.mean(0)) / data.data.std(0)).astype(np.float32)
    y = data.target.astype(np.int64)
    fit = LogisticRegression(C=1.0, max_iter=5000).fit(X[:400], y[:400])
    weights = save({
        "0.weight": torch.tensor(fit.coef_, dtype=torch.float32),
        "0.bias": torch.tensor(fit.intercept_, dtype=torch.float32),
    })
    spec = {
        "name": "bench", "family": "bernoulli",
        "architecture": {"layers": [{"type": "linear", "in_features": 30, "out_features": 1}]},
        "regularizer": {"kind": "l2", "strength": 1 / 400, "exclude": ["0.bias"]},
    }
    model = client.post("/v1/models", data={"spec": json.dumps(spec)},
                        files={"weights": ("w.safetensors", weights)})
    model.raise_for_status()

    ids = {"model_id": model.json()["id"]}
    sensitive = (X[:, 0] > np.median(X[:, 0])).astype(np.int64)
    for name, rows in (("train", slice(0, 400)), ("test", slice(400, None))):
        buffer = io.BytesIO()
        np.savez(buffer, X=X[rows], y=y[rows], sensitive=sensitive[rows])
        answer = client.post("/v1/datasets", data={"meta": json.dumps({"name": name})},
                             files={"file": (f"{name}.npz", buffer.getvalue())})
        answer.raise_for_status()
        ids[name] = answer.json()["id"]
    return ids


def job_mix(ids: dict[str, str]) -> list[dict[str, Any]]:
    """The background load: every kind, each a second or so of real engine work."""
    base = {"model_id": ids["model_id"], "dataset_id": ids["train"]}
    return [
        dict(base, kind="unlearning", params={"remove": [1, 2, 3], "solver": "cg"}),
        dict(base, kind="attribution", params={"test_dataset_id": ids["test"], "top_k": 5}),
        dict(base, kind="cv", params={"folds": 5, "solver": "exact"}),
        dict(base, kind="fairness", params={"unlearn": True}),
    ]


def submit_latencies(client: httpx.Client, body: dict[str, Any], count: int) -> list[float]:
    """Seconds per POST /v1/jobs, sequential; each job is cancelled right away so the
    measured submissions do not pile up work for the workers."""
    seconds = []
    for _ in range(count):
        start = time.perf_counter()
        answer = client.post("/v1/jobs", json=body)
        seconds.append(time.perf_counter() - start)
        answer.raise_for_status()
        client.post(f"/v1/jobs/{answer.json()['id']}/cancel")
    return seconds


def poll_throughput(url: str, key: str, job_id: str, seconds: float, concurrency: int) -> float:
    """GET /v1/jobs/{id} per second, `concurrency` clients polling back to back."""
    counts = [0] * concurrency
    stop = time.monotonic() + seconds

    def poll(slot: int) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as client:
            while time.monotonic() < stop:
                client.get(f"/v1/jobs/{job_id}").raise_for_status()
                counts[slot] += 1

    threads = [threading.Thread(target=poll, args=(i,)) for i in range(concurrency)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.monotonic() - start)


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "n": int(ms.size)}


def measure(client: httpx.Client, url: str, key: str, ids: dict[str, str],
            args: argparse.Namespace) -> dict[str, Any]:
    body = {"kind": "cv", "model_id": ids["model_id"], "dataset_id": ids["train"],
            "params": {"folds": 2}}
    probe = client.post("/v1/jobs", json=body).json()["id"]
    return {
        "submit": percentiles(submit_latencies(client, body, args.submits)),
        "poll_rps_1": poll_throughput(url, key, probe, args.poll_seconds, 1),
        f"poll_rps_{args.concurrency}": poll_throughput(
            url, key, probe, args.poll_seconds, args.concurrency
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--submits", type=int, default=100)
    parser.add_argument("--poll-seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="afif-bench-") as tmp:
        process, url, env = start_stack(Path(tmp), args.workers)
        try:
            key = api_key(env)
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"},
                              timeout=60) as client:
                ids = upload(client)

                # Idle: nothing for the workers to do.
                idle = measure(client, url, key, ids, args)

                # Busy: keep the workers fed with a job mix while measuring.
                feeding = threading.Event()
                done_jobs: list[str] = []

                def feed() -> None:
                    with httpx.Client(base_url=url, timeout=60,
                                      headers={"Authorization": f"Bearer {key}"}) as feeder:
                        mix = job_mix(ids)
                        i = 0
                        while not feeding.is_set():
                            pending = [
                                j for j in done_jobs[-4:]
                                if feeder.get(f"/v1/jobs/{j}").json()["status"]
                                in ("queued", "running")
                            ]
                            if len(pending) < 2:
                                job = feeder.post("/v1/jobs", json=mix[i % len(mix)]).json()
                                done_jobs.append(job["id"])
                                i += 1
                            time.sleep(0.2)

                feeder = threading.Thread(target=feed, daemon=True)
                feeder.start()
                time.sleep(2.0)
                busy = measure(client, url, key, ids, args)
                feeding.set()
                feeder.join()
                statuses = [client.get(f"/v1/jobs/{j}").json()["status"] for j in done_jobs]
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)

    conc = f"poll_rps_{args.concurrency}"
    report = {
        "what": "POST /v1/jobs latency and GET /v1/jobs/{id} throughput over loopback",
        "stack": f"afif up, {args.workers} CPU worker(s), SQLite, embedded Redis",
        "idle": idle,
        "busy": busy,
        "busy_over_idle": {
            "submit_p50": busy["submit"]["p50_ms"] / idle["submit"]["p50_ms"],
            "submit_p99": busy["submit"]["p99_ms"] / idle["submit"]["p99_ms"],
            "poll_rps_1": busy["poll_rps_1"] / idle["poll_rps_1"],
            conc: busy[conc] / idle[conc],
        },
        "background_jobs": {s: statuses.count(s) for s in sorted(set(statuses))},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")

    print(f"{'':24}{'idle':>12}{'busy':>12}{'busy/idle':>12}")
    rows = [
        ("submit p50 (ms)", idle["submit"]["p50_ms"], busy["submit"]["p50_ms"]),
        ("submit p99 (ms)", idle["submit"]["p99_ms"], busy["submit"]["p99_ms"]),
        ("poll req/s (1 client)", idle["poll_rps_1"], busy["poll_rps_1"]),
        (f"poll req/s ({args.concurrency} clients)", idle[conc], busy[conc]),
    ]
    for name, a, b in rows:
        print(f"{name:24}{a:12.1f}{b:12.1f}{b / a:12.2f}")
    print(f"background jobs: {report['background_jobs']}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
