"""Helpers shared by the benchmarks: timing, a plain-text table, and JSON results.

Results go to bench/results/<name>.json together with the environment they were
measured in (torch version, threads, device, CPU count). Ratios measured side by side in
one run are the numbers to compare; absolute times depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """--quick (smaller, for CI smoke runs), --threads, --device, --out."""
    parser.add_argument("--quick", action="store_true", help="fewer calls / smaller sizes")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: stable on a shared box)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/)")


def setup_torch(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def environment(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Where the numbers were measured."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], device: str | torch.device = "cpu") -> float:
    """Seconds for one call (CUDA synchronized on both sides)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def interleaved_medians(fns: dict[str, Callable[[], Any]], calls: int, warmup: int = 3,
                        device: str | torch.device = "cpu") -> dict[str, dict[str, float]]:
    """Median (and quartiles) seconds per call, calling the variants round-robin so that
    load changes on the machine hit all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(calls):
        for name, fn in fns.items():
            times[name].append(time_call(fn, device))
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        out[name] = {"median_s": statistics.median(ts), "q1_s": q[0], "q3_s": q[2],
                     "calls": len(ts)}
    return out


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A fixed-width table on stdout."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def write_results(name: str, payload: dict[str, Any], path: Path | None = None) -> Path:
    """Write bench/results/<name>.json (or `path`); returns the path written."""
    target = path or RESULTS_DIR / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\nwrote {target}")
    return target
