"""Iterations each solver needs for C x = ∇T (AFIF.md §5): LiSSA with the automatic
scale (1.05 × power-iteration λ_max) versus hand-picked scales 1 and 10, Fisher versus
Hessian, and CG for the same systems.

Problem: breast_cancer (standardized, 80/20 split), tanh MLP 30→64→2 (2114 parameters),
l2 λ = 1e-2, trained to a tight optimum (Adam, then float64 L-BFGS). The right-hand side
is the gradient of the mean test loss. LiSSA runs with a batch of every training row (its
products are then exact, so its residual is known at each step and it stops at 1e-3) and,
separately, with minibatches of 128 for a fixed depth. CG runs plain, with kept graphs,
and with a Jacobi preconditioner (the Fisher's diagonal, also for the Hessian).
Residuals ‖Cx − v‖/‖v‖ are on the full data. Prints tables; writes bench/results/bench_solvers.json.

    python bench/bench_solvers.py [--quick] [--max-depth 20000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import (
    add_common_args,
    environment,
    print_table,
    setup_torch,
    write_results,  # noqa: E402
)
from engine.device import resolve_device  # noqa: E402
from engine.errors import SolverDiverged  # noqa: E402
from engine.operators import CurvatureOperator, mean_gradient  # noqa: E402
from engine.problem import Problem  # noqa: E402
from engine.regularizers import make_regularizer  # noqa: E402
from engine.solvers import solve  # noqa: E402
from engine.spec import build_model  # noqa: E402
from engine.training import fit  # noqa: E402

TOL = 1e-3
LAMBDA = 1e-2


def trained_problem(device: torch.device) -> tuple[Problem, torch.Tensor, dict[str, Any]]:
    """The trained MLP problem and ∇(mean test loss) at θ̂."""
    X, y = load_breast_cancer(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(y))
    X = StandardScaler().fit_transform(X)[perm]
    y = y[perm]
    cut = int(0.8 * len(y))
    torch.manual_seed(0)
    model = build_model({"layers": [
        {"type": "linear", "in_features": 30, "out_features": 64}, {"type": "tanh"},
        {"type": "linear", "in_features": 64, "out_features": 2}]}, dtype=torch.float64)
    problem = Problem(model, "categorical", make_regularizer("l2", LAMBDA), X[:cut], y[:cut],
                      device=device)
    state, report = fit(problem, adam_steps=300, adam_lr=1e-2, max_iter=3000)
    problem.load_state_dict(state)

    test = Problem(problem.model, "categorical", None, X[cut:], y[cut:], device=device)
    rhs = mean_gradient(test)
    return problem, rhs, {"fit": report.to_dict(), "train_rows": cut, "test_rows": len(y) - cut}


def spectrum(problem: Problem) -> dict[str, float]:
    """Extreme eigenvalues of F + λI and H + λI from dense matrices (d = 2114)."""
    out = {}
    for kind in ("fisher", "hessian"):
        evals = torch.linalg.eigvalsh(CurvatureOperator(problem, kind).dense())
        out[f"{kind}_min"] = float(evals[0])
        out[f"{kind}_max"] = float(evals[-1])
    return out


def run(problem: Problem, rhs: torch.Tensor, kind: str, solver: str, **options: Any
        ) -> dict[str, Any]:
    op = CurvatureOperator(problem, kind, keep_graph=options.pop("keep_graph", False))
    start = time.perf_counter()
    try:
        _, report = solve(op, rhs, solver, **options)
    except SolverDiverged as exc:
        report = exc.report
    row = report.to_dict()
    row.pop("details", None)
    row.update(kind=kind, wall_time=time.perf_counter() - start,
               stopped_at_step=report.details.get("stopped_at_step"),
               power_iteration_products=report.details.get("power_iteration_products"))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--max-depth", type=int, default=None)
    args = parser.parse_args()
    setup_torch(args.threads)
    device = resolve_device(args.device)
    max_depth = args.max_depth or (5000 if args.quick else 20000)

    problem, rhs, meta = trained_problem(device)
    meta["spectrum"] = spectrum(problem)
    meta["parameters"] = problem.d

    lissa = []
    for kind in ("fisher", "hessian"):
        for scale in (None, 1.0, 10.0):
            row = run(problem, rhs, kind, "lissa", depth=max_depth, batch_size=problem.n,
                      scale=scale, tol=TOL)
            row["scale_choice"] = "auto" if scale is None else f"{scale:g}"
            lissa.append(row)
    stochastic = []
    for kind in ("fisher", "hessian"):
        row = run(problem, rhs, kind, "lissa", depth=2000 if not args.quick else 500,
                  batch_size=128, tol=TOL)
        stochastic.append(row)
    cg = []
    for kind in ("fisher", "hessian"):
        for keep, pre in ((False, None), (True, None), (False, "jacobi")):
            row = run(problem, rhs, kind, "cg", tol=TOL, keep_graph=keep, preconditioner=pre)
            row.update(keep_graph=keep, preconditioner=pre or "none")
            cg.append(row)

    print_table(f"LiSSA to a {TOL:g} residual, exact products (max depth {max_depth})",
                ["curvature", "scale", "σ", "steps", "residual", "converged", "diverged", "s"],
                [[r["kind"], r["scale_choice"], r["scale"], r["iterations"],
                  r["relative_residual"], r["converged"], r["diverged"], r["wall_time"]]
                 for r in lissa])
    print_table("LiSSA, minibatch 128, automatic scale, fixed depth",
                ["curvature", "steps", "residual", "diverged", "s"],
                [[r["kind"], r["iterations"], r["relative_residual"], r["diverged"],
                  r["wall_time"]] for r in stochastic])
    print_table(f"CG to a {TOL:g} residual (Jacobi: the Fisher diagonal, timed in s)",
                ["curvature", "kept graph", "precond.", "iterations", "residual", "converged",
                 "diverged", "s"],
                [[r["kind"], r["keep_graph"], r["preconditioner"], r["iterations"],
                  r["relative_residual"], r["converged"], r["diverged"], r["wall_time"]]
                 for r in cg])
    print_table("Spectrum (dense)", ["quantity", "value"],
                [[k, v] for k, v in meta["spectrum"].items()])
    write_results("bench_solvers", {"environment": environment(device), "tol": TOL,
                                    "lambda": LAMBDA, "problem": meta, "lissa_exact": lissa,
                                    "lissa_minibatch": stochastic, "cg": cg}, args.out)


if __name__ == "__main__":
    main()
