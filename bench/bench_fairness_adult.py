"""The paper's fairness experiment on UCI Adult (AFIF.md §6.1): score every training row
on the demographic-parity gap of a two-layer SeLU network, unlearn, and compare the
Fisher (AFIF) with the Hessian (IJ) — time, rows removed, DP and accuracy before and
after, for the default policy "auto" and the paper's rule "all".

Model: 102→W→2 SeLU MLP (categorical), l2 λ, trained by minibatch Adam (warm-up from
the random start) then full-batch L-BFGS in float64 (`engine.training.fit`). DP is
measured on the training rows (as in the paper) and on the test rows; "after" is the
returned (unlearned) model, "retrained" refits from θ̂ on the kept rows (warm start,
same objective with the 1/n kept). Solvers: CG on the Fisher (positive definite, it
converges), an exact eigen-solve on the Hessian (indefinite at this optimum, where CG
stops on negative curvature); each method's own solver is the fair comparison. Times
are the task's own phase timings, Fisher and Hessian run back to back in one process.
Writes bench/results/bench_fairness_adult.json.

    python bench/bench_fairness_adult.py --adult-dir /work/shared/data/adult [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import (  # noqa: E402
    add_common_args,
    environment,
    print_table,
    setup_torch,
    write_results,
)
from engine.data import load_adult  # noqa: E402
from engine.device import resolve_device  # noqa: E402
from engine.problem import Problem  # noqa: E402
from engine.regularizers import make_regularizer  # noqa: E402
from engine.spec import build_model  # noqa: E402
from engine.tasks import fairness  # noqa: E402
from engine.training import fit  # noqa: E402


def _dp_and_accuracy(problem: Problem, state: dict[str, torch.Tensor], X: np.ndarray,
                     y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """Demographic-parity gap and accuracy of the model with `state` on rows X."""
    model = problem.model
    original = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    with torch.no_grad():
        logits = model(torch.as_tensor(X, dtype=problem.dtype, device=problem.device))
    model.load_state_dict(original)
    p = torch.softmax(logits, dim=1)[:, 1].double().cpu().numpy()
    gap = abs(p[s == 1].mean() - p[s == 0].mean())
    accuracy = float(np.mean((p > 0.5) == (y == 1)))
    return float(gap), accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--adult-dir", type=Path, required=True,
                        help="folder with adult.data and adult.test")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--lam", type=float, default=1e-3)
    parser.add_argument("--fisher-solver", default="cg", help="exact, cg, lissa or auto")
    parser.add_argument("--hessian-solver", default="exact", help="exact, cg, lissa or auto")
    parser.add_argument("--cg-tol", type=float, default=1e-4,
                        help="CG relative residual target (float32 data: 1e-4 is reachable)")
    parser.add_argument("--damping", type=float, default=0.0,
                        help="δ added to both curvatures (e.g. for CG on the Hessian)")
    parser.add_argument("--adam-steps", type=int, default=2000,
                        help="minibatch Adam steps before L-BFGS")
    parser.add_argument("--adam-lr", type=float, default=3e-3)
    parser.add_argument("--max-iter", type=int, default=800, help="L-BFGS iterations")
    parser.add_argument("--retrain-iter", type=int, default=150,
                        help="L-BFGS iterations of the warm-started retraining check")
    parser.add_argument("--rows", type=int, default=None, help="subsample training rows")
    parser.add_argument("--no-retrain", action="store_true", help="skip the retrained check")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.width, args.max_iter = args.rows or 4000, 16, 200
        args.adam_steps, args.retrain_iter = 300, 100
    setup_torch(args.threads)
    device = resolve_device(args.device)

    data = load_adult(args.adult_dir)
    X, y, s = data.X_train, data.y_train, data.s_train
    if args.rows:
        keep = np.random.default_rng(0).permutation(len(y))[:args.rows]
        X, y, s = X[keep], y[keep], s[keep]
    torch.manual_seed(0)
    model = build_model({"layers": [
        {"type": "linear", "in_features": X.shape[1], "out_features": args.width},
        {"type": "selu"},
        {"type": "linear", "in_features": args.width, "out_features": 2}]})
    problem = Problem(model, "categorical", make_regularizer("l2", args.lam), X,
                      y.astype(np.int64), batch_size=4096, device=device)

    start = time.perf_counter()
    state, report = fit(problem, max_iter=args.max_iter, adam_steps=args.adam_steps,
                        adam_lr=args.adam_lr)
    train_time = time.perf_counter() - start
    problem.load_state_dict(state)
    print(f"trained d = {problem.d} on {problem.n} rows in {train_time:.1f} s: "
          f"{report.to_dict() if hasattr(report, 'to_dict') else report}")
    dp_train, acc_train = _dp_and_accuracy(problem, state, X, y, s)
    dp_test, acc_test = _dp_and_accuracy(problem, state, data.X_test, data.y_test, data.s_test)

    runs: list[dict[str, Any]] = []
    scores: dict[str, np.ndarray] = {}
    solvers = {"fisher": args.fisher_solver, "hessian": args.hessian_solver}
    options = {m: {"damping": args.damping} | ({"tol": args.cg_tol} if solver == "cg" else {})
               for m, solver in solvers.items()}
    for method in ("fisher", "hessian"):
        for policy in ("auto", "all"):
            start = time.perf_counter()
            result = fairness(problem, s, policy=policy, method=method,
                              solver=solvers[method],
                              solver_options=options[method])
            scores[method] = result.arrays["scores"]
            wall = time.perf_counter() - start
            values = result.values
            assert result.parameters is not None
            dp_test_after, acc_test_after = _dp_and_accuracy(
                problem, result.parameters, data.X_test, data.y_test, data.s_test)
            run: dict[str, Any] = {
                "method": method, "policy": policy, "solver": solvers[method],
                "wall_s": wall, "converged": values["converged"],
                "max_relative_residual": values["max_relative_residual"],
                "timings": result.timings, "n_removed": values["n_removed"],
                "fraction_removed": values["fraction_removed"],
                "dp_train_before": values["metric_before"],
                "dp_train_after": values["metric_after"],
                "accuracy_train_before": values["accuracy_before"],
                "accuracy_train_after": values["accuracy_after"],
                "dp_test_after": dp_test_after, "accuracy_test_after": acc_test_after,
                "solves": [{k: r[k] for k in ("solver", "iterations", "products",
                                              "relative_residual", "wall_time", "details")
                            if k in r and k != "details"}
                           | {"details": {k: v for k, v in r.get("details", {}).items()
                                          if k != "residual_history"}}
                           for r in values["curvature"]["solves"]],
                "candidates": values.get("candidates", []),
            }
            if not args.no_retrain and values["n_removed"]:
                weights = torch.ones(problem.n)
                weights[torch.as_tensor(result.arrays["removed"])] = 0.0
                retrained, _ = fit(problem, weights=weights, max_iter=args.retrain_iter)
                run["dp_train_retrained"], run["accuracy_train_retrained"] = \
                    _dp_and_accuracy(problem, retrained, X, y, s)
                run["dp_test_retrained"], run["accuracy_test_retrained"] = _dp_and_accuracy(
                    problem, retrained, data.X_test, data.y_test, data.s_test)
            runs.append(run)
            print(f"{method}/{policy}: removed {values['n_removed']}, DP "
                  f"{values['metric_before']:.4f} -> {values['metric_after']:.4f} in {wall:.1f} s")

    rows = []
    for run in runs:
        rows.append([run["method"], run["policy"], run["solver"], run["wall_s"],
                     run["timings"].get("solve", 0.0), run["n_removed"],
                     run["dp_train_before"], run["dp_train_after"],
                     run.get("dp_train_retrained", float("nan")),
                     run["accuracy_train_after"], run["dp_test_after"],
                     run["accuracy_test_after"], run.get("dp_test_retrained", float("nan"))])
    print_table(f"Adult fairness (n = {problem.n}, d = {problem.d}, λ = {args.lam}; "
                f"before: train DP {dp_train:.4f}, acc {acc_train:.4f}; "
                f"test DP {dp_test:.4f}, acc {acc_test:.4f})",
                ["method", "policy", "solver", "wall s", "solve s", "removed", "DP before",
                 "DP after", "DP retrained", "acc after", "test DP after", "test acc after",
                 "test DP retrained"], rows)
    fisher_wall = sum(r["wall_s"] for r in runs if r["method"] == "fisher")
    hessian_wall = sum(r["wall_s"] for r in runs if r["method"] == "hessian")
    fisher_solve = sum(r["timings"].get("solve", 0.0) for r in runs if r["method"] == "fisher")
    hessian_solve = sum(r["timings"].get("solve", 0.0) for r in runs
                        if r["method"] == "hessian")
    agreement = float(spearmanr(scores["fisher"], scores["hessian"]).statistic)
    print(f"Fisher / Hessian wall time (both policies): {fisher_wall / hessian_wall:.3f}; "
          f"solve phase: {fisher_solve / hessian_solve:.3f}")
    print(f"Spearman(Fisher scores, Hessian scores) = {agreement:.3f}")

    write_results("bench_fairness_adult", {
        "environment": environment(device),
        "rows": problem.n, "parameters": problem.d, "width": args.width, "lambda": args.lam,
        "solvers": solvers, "solver_options": options, "damping": args.damping,
        "adam_steps": args.adam_steps, "adam_lr": args.adam_lr, "lbfgs_max_iter": args.max_iter,
        "retrain_iter": args.retrain_iter, "train_time_s": train_time,
        "fit": report.to_dict() if hasattr(report, "to_dict") else str(report),
        "before": {"dp_train": dp_train, "accuracy_train": acc_train, "dp_test": dp_test,
                   "accuracy_test": acc_test},
        "runs": runs, "fisher_over_hessian_wall": fisher_wall / hessian_wall,
        "fisher_over_hessian_solve": fisher_solve / hessian_solve,
        "score_spearman_fisher_hessian": agreement,
    }, args.out)


if __name__ == "__main__":
    main()
