"""Cost of one Fisher product versus one Hessian product (AFIF.md §2 and §8).

SeLU MLPs 100→W→2 (categorical) and 100→W→1 (bernoulli), float32, batch 100, a fresh
random minibatch at every call (as LiSSA uses them), median of N calls made round-robin:
  Fisher  jvp_vjp          torch.func.jvp, Λ in output space, a fresh torch.func.vjp
  Fisher  fused            one forward with dual numbers + one backward
  Hessian fwd_rev          torch.func.jvp of torch.func.grad
  Hessian double_backward  grad with create_graph, then grad of ⟨g, v⟩
and, on one fixed batch whose first-order graph is kept across calls (what CG on a fixed
batch can do): Fisher via torch.func.linearize + kept vjp, Hessian via a kept
create_graph gradient. Prints a table; writes bench/results/bench_products.json.

    python bench/bench_products.py [--quick] [--widths 1000 30000] [--calls 50]
"""

from __future__ import annotations

import argparse
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
    time_call,
    write_results,
)
from engine.device import resolve_device  # noqa: E402
from engine.operators import CurvatureOperator, KeptBatch  # noqa: E402
from engine.problem import Problem  # noqa: E402
from engine.regularizers import make_regularizer  # noqa: E402
from engine.spec import build_model  # noqa: E402

FRESH = [("fisher", "jvp_vjp"), ("fisher", "fused"), ("hessian", "fwd_rev"),
         ("hessian", "double_backward")]


def make_problem(width: int, outputs: int, rows: int, device: torch.device) -> Problem:
    """Random data labelled by a random teacher; the student at its random init."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(rows, 100, generator=gen)
    logits = X @ torch.randn(100, max(outputs, 2), generator=gen) / 10
    y = logits.argmax(1) if outputs > 1 else (logits[:, 0] > logits[:, 1]).float()
    torch.manual_seed(0)
    model = build_model({"layers": [
        {"type": "linear", "in_features": 100, "out_features": width},
        {"type": "selu"},
        {"type": "linear", "in_features": width, "out_features": outputs}]})
    family = "categorical" if outputs > 1 else "bernoulli"
    return Problem(model, family, make_regularizer("l2", 1e-3), X, y, device=device)


def bench_one(width: int, outputs: int, calls: int, batch: int, device: torch.device
              ) -> dict[str, Any]:
    problem = make_problem(width, outputs, rows=20 * batch, device=device)
    v = torch.randn(problem.d, generator=torch.Generator().manual_seed(1)).to(device)

    fns = {}
    for seed, (kind, variant) in enumerate(FRESH):
        op = CurvatureOperator(problem, kind, variant).minibatch(batch, seed=seed)
        fns[f"{kind}:{variant}"] = (lambda op=op: op.matvec(v))
    idx = torch.arange(batch, device=device)
    kept = {kind: KeptBatch(problem, idx, kind) for kind in ("fisher", "hessian")}
    fns["fisher:kept_linearize"] = lambda: kept["fisher"].matvec(v)
    fns["hessian:kept_double_backward"] = lambda: kept["hessian"].matvec(v)
    medians = interleaved_medians(fns, calls, device=device)

    # Building the kept graphs is paid once per batch; report it next to the per-call cost.
    build = {kind: time_call(lambda kind=kind: KeptBatch(problem, idx, kind), device)
             for kind in ("fisher", "hessian")}
    m = {k: r["median_s"] for k, r in medians.items()}
    ratios = {
        "jvp_vjp / fwd_rev": m["fisher:jvp_vjp"] / m["hessian:fwd_rev"],
        "jvp_vjp / double_backward": m["fisher:jvp_vjp"] / m["hessian:double_backward"],
        "fused / fwd_rev": m["fisher:fused"] / m["hessian:fwd_rev"],
        "fused / double_backward": m["fisher:fused"] / m["hessian:double_backward"],
        "fused / faster Hessian": m["fisher:fused"] / min(m["hessian:fwd_rev"],
                                                          m["hessian:double_backward"]),
        "kept linearize / kept double_backward":
            m["fisher:kept_linearize"] / m["hessian:kept_double_backward"],
    }
    return {"width": width, "outputs": outputs, "parameters": problem.d, "batch": batch,
            "timings": medians, "ratios": ratios, "kept_build_s": build}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--widths", type=int, nargs="+", default=[1000])
    parser.add_argument("--calls", type=int, default=None, help="calls per variant (>= 30)")
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()
    setup_torch(args.threads)
    device = resolve_device(args.device)
    calls = args.calls or (30 if args.quick else 50)

    runs = [bench_one(w, k, calls, args.batch, device) for w in args.widths for k in (2, 1)]

    rows = []
    for run in runs:
        for name, t in run["timings"].items():
            rows.append([f"100→{run['width']}→{run['outputs']}", name,
                         1e3 * t["median_s"], 1e3 * t["q1_s"], 1e3 * t["q3_s"]])
    print_table(f"One product, batch {args.batch}, median of {calls} calls (ms)",
                ["model", "variant", "median", "q1", "q3"], rows)
    ratio_rows = [[f"100→{r['width']}→{r['outputs']}", name, value]
                  for r in runs for name, value in r["ratios"].items()]
    print_table("Fisher ÷ Hessian (per product, side by side)", ["model", "ratio", "value"],
                ratio_rows)
    write_results("bench_products", {"environment": environment(device), "calls": calls,
                                     "runs": runs}, args.out)


if __name__ == "__main__":
    main()
