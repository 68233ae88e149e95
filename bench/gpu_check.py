"""The engine on an accelerator against a float64 CPU reference (the GPU check).

Two small problems, trained on the CPU in float64: an L2 logistic regression on
breast_cancer and a tanh MLP on digits (3 vs 8). For each, attribution, unlearning and
leave-k-out CV run with the Fisher and the Hessian on --device in float32 with CG, and
again on the CPU in float64 with exact solves; the table gives the relative difference
of each result (max-norm of the difference over max-norm of the reference; for
unlearning, over the size of the step itself). Writes bench/results/gpu_check.json and
exits 1 when a difference exceeds --rtol.

    python bench/gpu_check.py [--device cuda] [--rtol 1e-3]

Without CUDA it refuses, unless `--device cpu` is given (float32 CG against float64
exact on the CPU: a check of the script and of float32 itself).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import environment, print_table, setup_torch, write_results  # noqa: E402
from engine.problem import Problem  # noqa: E402
from engine.regularizers import make_regularizer  # noqa: E402
from engine.spec import build_model  # noqa: E402
from engine.tasks import attribute, cross_validate, unlearn  # noqa: E402
from engine.training import fit  # noqa: E402

LAM = 1e-2
REMOVE = list(range(0, 40, 4))  # ten training rows to unlearn
CV_K, CV_FOLDS = 20, 3


def _data(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_breast_cancer, load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    if name == "logistic":
        X, y = load_breast_cancer(return_X_y=True)
    else:
        X, y = load_digits(return_X_y=True)
        keep = (y == 3) | (y == 8)
        X, y = X[keep], (y[keep] == 8).astype(int)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, random_state=0)
    scaler = StandardScaler().fit(X_tr)
    return scaler.transform(X_tr), y_tr.astype(float), scaler.transform(X_te), y_te.astype(float)


def _architecture(name: str, d: int) -> dict[str, Any]:
    if name == "logistic":
        return {"layers": [{"type": "linear", "in_features": d, "out_features": 1}]}
    return {"layers": [{"type": "linear", "in_features": d, "out_features": 16},
                       {"type": "tanh"},
                       {"type": "linear", "in_features": 16, "out_features": 1}]}


def reference_problem(name: str) -> tuple[Problem, np.ndarray, np.ndarray]:
    """The problem at its float64 optimum on the CPU, plus the test rows."""
    X, y, X_te, y_te = _data(name)
    torch.manual_seed(0)
    model = build_model(_architecture(name, X.shape[1]), dtype=torch.float64)
    problem = Problem(model, "bernoulli", make_regularizer("l2", LAM), X, y, device="cpu")
    state, report = fit(problem, max_iter=5000, adam_steps=0 if name == "logistic" else 500)
    problem.load_state_dict(state)
    print(f"{name}: d={problem.d}, n={problem.n}, fit gradient norm {report.gradient_norm:.2e}")
    return problem, X_te, y_te


def on_device(reference: Problem, device: str, dtype: torch.dtype) -> Problem:
    """The same model and data, moved to `device` in `dtype`."""
    model = copy.deepcopy(reference.model).to(dtype)
    return Problem(model, reference.family, reference.regularizer, reference.X.to(dtype),
                   reference.y, device=device)


def run_tasks(problem: Problem, X_te: np.ndarray, y_te: np.ndarray, method: str, solver: str,
              options: dict[str, Any]) -> dict[str, Any]:
    """Attribution scores, the unlearned θ̃ and the CV estimate, as float64 numpy."""
    def flat(state: dict[str, torch.Tensor]) -> np.ndarray:
        names = [n for n, _ in problem.model.named_parameters()]
        return np.concatenate([state[n].detach().double().cpu().reshape(-1).numpy()
                               for n in names])

    dtype = problem.dtype
    start = time.perf_counter()
    scores = attribute(problem, torch.as_tensor(X_te, dtype=dtype), torch.as_tensor(y_te),
                       method=method, solver=solver, solver_options=options)
    removed = unlearn(problem, REMOVE, method=method, solver=solver, solver_options=options)
    cv = cross_validate(problem, k=CV_K, folds=CV_FOLDS, method=method, solver=solver,
                        solver_options=options)
    assert removed.parameters is not None
    return {
        "scores": np.asarray(scores.arrays["mean_scores"], dtype=np.float64),
        "theta_hat": flat(problem.state_dict()),
        "theta_new": flat(removed.parameters),
        "cv": float(cv.values["estimate"]),
        "converged": all(r.values["converged"] for r in (scores, removed, cv)),
        "seconds": time.perf_counter() - start,
    }


def compare(got: dict[str, Any], ref: dict[str, Any]) -> dict[str, float]:
    def rel(a: np.ndarray, b: np.ndarray, scale: np.ndarray) -> float:
        return float(np.abs(a - b).max() / max(np.abs(scale).max(), 1e-300))

    step = ref["theta_new"] - ref["theta_hat"]
    return {
        "scores": rel(got["scores"], ref["scores"], ref["scores"]),
        "unlearning": rel(got["theta_new"], ref["theta_new"], step),
        "cv": abs(got["cv"] - ref["cv"]) / abs(ref["cv"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--rtol", type=float, default=1e-3,
                        help="largest accepted relative difference (float32 vs float64)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for the reference")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here; run on a GPU machine, or pass --device cpu to check "
              "float32 against float64 on the CPU", file=sys.stderr)
        return 2
    setup_torch(args.threads)

    options = {"tol": 1e-6, "max_iter": 2000}
    rows, records, worst = [], [], 0.0
    for name in ("logistic", "mlp"):
        reference, X_te, y_te = reference_problem(name)
        for method in ("fisher", "hessian"):
            ref = run_tasks(reference, X_te, y_te, method, "exact", {})
            got = run_tasks(on_device(reference, args.device, torch.float32), X_te, y_te,
                            method, "cg", options)
            diffs = compare(got, ref)
            worst = max(worst, *diffs.values())
            rows.append([name, method, diffs["scores"], diffs["unlearning"], diffs["cv"],
                         got["converged"], got["seconds"], ref["seconds"]])
            records.append({"problem": name, "method": method, "d": reference.d,
                            "relative_difference": diffs, "converged": got["converged"],
                            "device_seconds": got["seconds"], "cpu64_seconds": ref["seconds"]})

    print_table(f"{args.device} float32 CG vs CPU float64 exact (relative differences)",
                ["problem", "method", "scores", "unlearning", "cv", "converged",
                 "device s", "cpu64 s"], rows)
    ok = worst <= args.rtol
    print(f"\nlargest difference {worst:.2e}: {'within' if ok else 'ABOVE'} rtol {args.rtol:g}")
    write_results("gpu_check", {"environment": environment(args.device), "rtol": args.rtol,
                                "worst": worst, "passed": ok, "runs": records}, args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
