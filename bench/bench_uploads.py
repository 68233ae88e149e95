"""Upload and submission costs of the API, measured side by side in one run.

1. POST /v1/datasets of the same table as .npz, .csv and .parquet (parse + validate +
   normalize + store), as ratios to .npz.
2. POST /v1/jobs (validation reads the stored labels) on a small and a 100x larger
   training set, as a ratio, to show what the per-submission label check costs.

Runs in-process (FastAPI TestClient, SQLite in a temp dir, the queue replaced by a no-op).
Prints a table and writes bench/results/bench_uploads.json.

    python -m bench.bench_uploads [--rows 20000] [--features 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save

from service.app import create_app
from service.auth import create_api_key
from service.db import migrate, session_scope
from service.settings import Settings

RESULTS = Path(__file__).resolve().parent / "results" / "bench_uploads.json"


def _median_seconds(action: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _files(X: np.ndarray, y: np.ndarray) -> dict[str, tuple[str, bytes, dict[str, Any] | None]]:
    npz = io.BytesIO()
    np.savez(npz, X=X, y=y)
    frame = pd.DataFrame(X, columns=[f"f{i}" for i in range(X.shape[1])])
    frame["label"] = y
    parquet = io.BytesIO()
    frame.to_parquet(parquet)
    meta = {"target": "label"}
    return {
        "npz": ("d.npz", npz.getvalue(), None),
        "csv": ("d.csv", frame.to_csv(index=False).encode(), meta),
        "parquet": ("d.parquet", parquet.getvalue(), meta),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    X = rng.standard_normal((args.rows, args.features)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp), max_upload_bytes=1 << 30)
        migrate(settings.database_url)
        with session_scope(settings.database_url) as session:
            key = create_api_key(session, "bench")
        app = create_app(settings, enqueue=lambda _id: None, cancel_in_queue=lambda _id: True,
                         redis_ping=lambda: True)
        auth = {"Authorization": f"Bearer {key}"}
        client = TestClient(app)

        def upload(name: str, content: bytes, meta: dict[str, Any] | None) -> str:
            data = {"meta": json.dumps(meta)} if meta else {}
            response = client.post("/v1/datasets", headers=auth,
                                   files={"file": (name, content)}, data=data)
            assert response.status_code == 201, response.text
            return str(response.json()["id"])

        rows: list[dict[str, Any]] = []
        files = _files(X, y)
        for fmt, (name, content, meta) in files.items():
            seconds = _median_seconds(lambda n=name, c=content, m=meta: upload(n, c, m),
                                      args.repeats)
            rows.append({"case": f"upload .{fmt}", "bytes": len(content), "seconds": seconds})
        base = rows[0]["seconds"]
        for row in rows:
            row["ratio"] = row["seconds"] / base

        spec = {"name": "lr", "family": "bernoulli",
                "architecture": {"layers": [{"type": "linear", "in_features": args.features,
                                             "out_features": 1}]},
                "regularizer": {"kind": "l2", "strength": 1e-3}}
        weights = save({"0.weight": torch.zeros(1, args.features), "0.bias": torch.zeros(1)})
        model = client.post("/v1/models", headers=auth, data={"spec": json.dumps(spec)},
                            files={"weights": ("w.safetensors", weights)}).json()["id"]
        small_n = max(args.rows // 100, 10)
        small = upload("s.npz", _files(X[:small_n], y[:small_n])["npz"][1], None)
        large = upload("l.npz", files["npz"][1], None)

        def submit(dataset_id: str) -> None:
            body = {"kind": "unlearning", "model_id": model, "dataset_id": dataset_id,
                    "params": {"remove": [0]}}
            assert client.post("/v1/jobs", headers=auth, json=body).status_code == 202

        submit_rows = []
        for label, dataset_id, n in (("submit, small", small, small_n),
                                     ("submit, large", large, args.rows)):
            seconds = _median_seconds(lambda d=dataset_id: submit(d), args.repeats)
            submit_rows.append({"case": f"{label} ({n} rows)", "bytes": None, "seconds": seconds})
        for row in submit_rows:
            row["ratio"] = row["seconds"] / submit_rows[0]["seconds"]
        rows += submit_rows

    print(f"{'case':32} {'bytes':>12} {'median ms':>10} {'ratio':>7}")
    for row in rows:
        size = "" if row["bytes"] is None else str(row["bytes"])
        print(f"{row['case']:32} {size:>12} {1000 * row['seconds']:10.1f} {row['ratio']:7.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": args.rows, "features": args.features,
                                   "repeats": args.repeats, "results": rows}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
