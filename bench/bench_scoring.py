"""Cost of scoring every training row (AFIF.md §4): one forward-mode pass of the per-row
losses along s = C⁻¹∇T, against one plain forward + backward pass over the same data.

Model: SeLU MLP D→W→2 (categorical), float32, random weights (the cost of a pass does
not depend on the optimum), random standardized inputs shaped like Adult (D = 102).
Timings are interleaved medians of the two passes in one run; the ratio is the number
to read (target ≤ 2). Memory: peak resident-set growth of each pass over a baseline
that already holds the data and the model (Linux VmHWM after a reset), measured in a
fresh subprocess per variant, next to the n × d × 4 bytes of the per-row gradient
matrix that scoring avoids (computed; also measured by materializing it on a row
subset). The subprocess runs with glibc's mmap threshold lowered and trims the heap
before the measured pass, so memory freed by the warm-up pass goes back to the system
and the measured pass's own allocations show up in the RSS instead of silently reusing
freed heap (which read as 0 bytes before).
Writes bench/results/bench_scoring.json.

    python bench/bench_scoring.py [--quick] [--rows 30000] [--width 256]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import (  # noqa: E402
    add_common_args,
    environment,
    interleaved_medians,
    print_table,
    setup_torch,
    write_results,
)
from engine.device import resolve_device  # noqa: E402
from engine.operators import mean_gradient, per_sample_gradients  # noqa: E402
from engine.problem import Problem  # noqa: E402
from engine.regularizers import make_regularizer  # noqa: E402
from engine.spec import build_model  # noqa: E402
from engine.tasks import _scores  # noqa: E402

INPUTS = 102
BATCH = 1024
# glibc settings for the memory subprocesses: allocations above 64 KiB are mmapped and
# freed memory is returned at once, so RSS follows live memory.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def make_problem(rows: int, width: int, device: str, seed: int = 0) -> Problem:
    """The benchmark problem: random data, random SeLU MLP, l2 penalty."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(rows, INPUTS, generator=gen)
    y = torch.randint(0, 2, (rows,), generator=gen)
    torch.manual_seed(seed)
    model = build_model({"layers": [
        {"type": "linear", "in_features": INPUTS, "out_features": width}, {"type": "selu"},
        {"type": "linear", "in_features": width, "out_features": 2}]})
    return Problem(model, "categorical", make_regularizer("l2", 1e-3), X, y,
                   batch_size=BATCH, device=device)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_variant(variant: str, rows: int, width: int, device: str, threads: int) -> int:
    """Peak RSS growth (bytes) of one pass, in this process (called in a subprocess).

    Linux: the baseline holds the data, the model and the direction; one warm-up pass
    loads kernels and one-off buffers; the heap is trimmed and the high-water mark reset
    through /proc/self/clear_refs just before the measured pass, so the number is the
    pass's own peak above the resident set it started from.
    """
    setup_torch(threads)
    problem = make_problem(rows, width, device)
    direction = torch.randn(problem.d, dtype=problem.dtype, device=problem.device)
    passes = {"forward_backward": lambda: mean_gradient(problem),
              "scoring": lambda: _scores(problem, direction),
              "per_sample": lambda: per_sample_gradients(problem)}
    run = passes[variant]
    run()

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    result = run()
    peak = (_status_kib("VmHWM") - before) * 1024
    del result
    return peak


def measure_memory(variant: str, rows: int, width: int, device: str, threads: int) -> int:
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); "
            f"from bench.bench_scoring import run_variant; "
            f"print(run_variant({variant!r}, {rows}, {width}, {device!r}, {threads}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, **MALLOC_ENV})
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--rows", type=int, default=30000)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--calls", type=int, default=7)
    args = parser.parse_args()
    if args.quick:
        args.rows, args.width, args.calls = 4000, 64, 3
    setup_torch(args.threads)
    device = str(resolve_device(args.device))

    problem = make_problem(args.rows, args.width, device)
    direction = torch.randn(problem.d, dtype=problem.dtype, device=problem.device)
    timings = interleaved_medians({
        "forward_backward": lambda: mean_gradient(problem),
        "scoring": lambda: _scores(problem, direction),
    }, calls=args.calls, warmup=1, device=device)
    ratio = timings["scoring"]["median_s"] / timings["forward_backward"]["median_s"]

    matrix_bytes = problem.n * problem.d * problem.X.element_size()
    subset = min(args.rows, 2000)
    memory = {
        "forward_backward_peak_bytes": measure_memory("forward_backward", args.rows,
                                                      args.width, device, args.threads),
        "scoring_peak_bytes": measure_memory("scoring", args.rows, args.width, device,
                                             args.threads),
        "gradient_matrix_bytes": matrix_bytes,
        "gradient_matrix_subset_rows": subset,
        "gradient_matrix_subset_peak_bytes": measure_memory("per_sample", subset,
                                                            args.width, device, args.threads),
        "gradient_matrix_subset_bytes": subset * problem.d * problem.X.element_size(),
        "method": "peak RSS growth over a loaded baseline, fresh subprocess per pass, "
                  "glibc mmap threshold 64 KiB, heap trimmed before the pass",
    }
    memory["scoring_over_gradient_matrix"] = memory["scoring_peak_bytes"] / matrix_bytes
    if memory["scoring_peak_bytes"] <= 0:
        raise RuntimeError("scoring peak memory read as 0: the RSS measurement failed")

    mib = 2.0**20
    print_table(f"Scoring all {problem.n} rows vs one forward+backward pass "
                f"(d = {problem.d}, {device})",
                ["pass", "median s", "q1 s", "q3 s", "peak RSS growth MiB"],
                [["forward_backward", timings["forward_backward"]["median_s"],
                  timings["forward_backward"]["q1_s"], timings["forward_backward"]["q3_s"],
                  memory["forward_backward_peak_bytes"] / mib],
                 ["scoring (jvp)", timings["scoring"]["median_s"], timings["scoring"]["q1_s"],
                  timings["scoring"]["q3_s"], memory["scoring_peak_bytes"] / mib]])
    print(f"scoring / forward+backward = {ratio:.3f}  (target <= 2)")
    print(f"n x d gradient matrix: {matrix_bytes / mib:.1f} MiB (computed); "
          f"on {subset} rows measured {memory['gradient_matrix_subset_peak_bytes'] / mib:.1f} "
          f"MiB for {memory['gradient_matrix_subset_bytes'] / mib:.1f} MiB of gradients")
    print(f"scoring peak / n x d x 4 bytes = {memory['scoring_over_gradient_matrix']:.2e}")

    payload: dict[str, Any] = {
        "environment": environment(device),
        "rows": problem.n, "parameters": problem.d, "width": args.width, "batch": BATCH,
        "timings": timings, "ratio_scoring_over_forward_backward": ratio,
        "memory": memory,
    }
    write_results("bench_scoring", json.loads(json.dumps(payload)), args.out)


if __name__ == "__main__":
    main()
