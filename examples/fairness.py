"""Fairness by unlearning: utility vs fairness for ERM, Fisher- and Hessian-unlearned models.

Default: scikit-learn's diabetes data (regression, gaussian family) with `sex` as the
sensitive attribute and the χ² dependence between prediction and sex as the metric.
With --adult-dir: UCI Adult (classification, bernoulli) with demographic parity
between women and men. Both use a two-layer SeLU network trained here by full-batch
L-BFGS. The fairness job scores every training row by how its removal would change
the metric and unlearns the rows whose removal lowers it (policy `auto`), once with the
Fisher and once with the Hessian as curvature.

Writes fairness.png (metric vs test utility; job times) and fairness.md.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client import Client  # noqa: E402
from engine.data import TabularSplit, load_adult, load_sklearn  # noqa: E402
from examples import common  # noqa: E402

FIG_SIZE = (10.0, 4.0)  # inches; at FIG_DPI this is 1000 x 400 pixels
FIG_DPI = 100


def selu_net(d: int, hidden: int, seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.SELU(),
                               torch.nn.Linear(hidden, 1))


def group_gap(pred: np.ndarray, s: np.ndarray) -> float:
    """|mean prediction in group 1 − in group 0| (probabilities or regression means)."""
    return float(abs(pred[s == 1].mean() - pred[s == 0].mean()))


def utility(module: torch.nn.Module, X: np.ndarray, y: np.ndarray, regression: bool) -> float:
    """Test MSE (regression, mean of (f−y)²) or test accuracy (classification)."""
    f = common.predictions(module, X).ravel()
    if regression:
        return float(np.mean((f - y) ** 2))
    return float(np.mean((f > 0) == (y > 0.5)))


def test_outputs(module: torch.nn.Module, X: np.ndarray, regression: bool) -> np.ndarray:
    f = common.predictions(module, X).ravel()
    return f if regression else 1.0 / (1.0 + np.exp(-f))


def run(client: Client, data: TabularSplit, *, regression: bool, hidden: int, lam: float,
        seed: int, out: Path, dataset_name: str, policy: str = "auto",
        max_drop: float = 0.05) -> dict[str, Any]:
    family = "gaussian" if regression else "bernoulli"
    metric = "chi2" if regression else "demographic_parity"
    utility_name = "test MSE" if regression else "test accuracy"
    assert data.s_train is not None and data.s_test is not None
    X, y = data.X_train.astype(np.float32), data.y_train
    y_up = y.astype(np.float32) if regression else y.astype(np.int64)

    with common.Stopwatch() as sw:
        erm = common.fit(selu_net(X.shape[1], hidden, seed), X, y_up, family=family, lam=lam)
    print(f"{dataset_name}: {len(y)} training rows, SeLU {X.shape[1]}→{hidden}→1, "
          f"λ={lam:g}, trained in {sw.seconds:.1f}s")
    model = client.register_model(erm, family=family, name=f"{dataset_name}-selu",
                                  regularizer={"kind": "l2", "strength": lam})
    train = client.register_dataset(X, y_up, sensitive=data.s_train.astype(np.int64),
                                    name=f"{dataset_name}-train")

    rows: list[dict[str, Any]] = [{
        "model": "ERM", "train_metric": None, "utility": utility(erm, data.X_test,
                                                                 data.y_test, regression),
        "test_gap": group_gap(test_outputs(erm, data.X_test, regression), data.s_test),
        "removed": 0, "seconds": sw.seconds, "status": "trained",
    }]
    for method in ("fisher", "hessian"):
        job = client.submit("fairness", model=model, dataset=train, metric=metric,
                            unlearn=True, policy=policy, max_accuracy_drop=max_drop,
                            method=method)
        with common.Stopwatch() as wall:
            job.wait(progress=True, raise_on_failure=False)
        if job.status != "succeeded":
            err = job.error
            rows.append({"model": f"{method}-unlearned", "train_metric": None,
                         "utility": None, "test_gap": None, "removed": 0,
                         "seconds": common.job_seconds(job),
                         "status": f"{job.status}: {err.code if err else ''}"})
            print(f"{method}: job {job.id} {job.status}: {err.message if err else ''}")
            continue
        res = job.result()
        rows[0]["train_metric"] = res["metric_before"]
        new = client.download_model(res["model_id"]) if res.get("model_id") else erm
        rows.append({
            "model": f"{method}-unlearned", "train_metric": res["metric_after"],
            "utility": utility(new, data.X_test, data.y_test, regression),
            "test_gap": group_gap(test_outputs(new, data.X_test, regression), data.s_test),
            "removed": int(res["n_removed"]), "seconds": common.job_seconds(job),
            "status": "succeeded", "wall_seconds": wall.seconds,
        })
        print(f"{method}: {metric} {res['metric_before']:.4f} -> {res['metric_after']:.4f}, "
              f"removed {res['n_removed']} rows, {common.job_seconds(job):.2f}s")

    table = common.markdown_table(
        ["model", f"train {metric}", utility_name, "test group gap", "rows removed",
         "seconds", "status"],
        [[r["model"], _num(r["train_metric"]), _num(r["utility"]), _num(r["test_gap"]),
          r["removed"], r["seconds"], r["status"]] for r in rows])
    print("\n" + table)
    _plot(rows, metric, utility_name, out / "fairness.png")
    intro = (f"# Fairness by unlearning on {dataset_name}\n\n"
             f"Metric `{metric}` on the training set (before = ERM); utility and the gap "
             f"|mean output(s=1) − mean output(s=0)| on the held-out test set. Policy "
             f"`{policy}`, utility cap {max_drop:g} (accuracy points, or relative MSE "
             f"increase, on the training set). Seconds: training for ERM, engine time of "
             f"the fairness job otherwise.")
    summary = {"dataset": dataset_name, "metric": metric, "family": family, "lam": lam,
               "policy": policy, "max_accuracy_drop": max_drop,
               "hidden": hidden, "n_train": len(y), "rows": rows}
    common.write_outputs(out, "fairness", table, summary, intro)
    return summary


def _num(v: Any) -> Any:
    return "-" if v is None else float(v)


def _plot(rows: list[dict[str, Any]], metric: str, utility_name: str, path: Path) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=FIG_SIZE, dpi=FIG_DPI)
    colors = {"ERM": "tab:gray", "fisher-unlearned": "tab:blue",
              "hessian-unlearned": "tab:orange"}
    for r in rows:
        if r["train_metric"] is not None and r["utility"] is not None:
            ax1.scatter(r["train_metric"], r["utility"], s=60, color=colors[r["model"]],
                        label=f"{r['model']} ({r['removed']} removed)")
    ax1.set_xlabel(f"train {metric} (lower is fairer)")
    ax1.set_ylabel(utility_name)
    ax1.legend(fontsize=8)
    ax1.set_title("utility vs fairness")
    names = [r["model"] for r in rows]
    ax2.bar(names, [r["seconds"] for r in rows], color=[colors[n] for n in names])
    ax2.set_ylabel("seconds")
    ax2.set_title("ERM training vs fairness job (engine time)")
    common.save_figure(fig, path, FIG_DPI)


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.splitlines()[0], "fairness")
    p.add_argument("--adult-dir", type=Path, help="folder with adult.data and adult.test")
    p.add_argument("--adult-rows", type=int, default=None,
                   help="random training rows of Adult to use (default all; 2000 with --quick)")
    p.add_argument("--policy", choices=("auto", "all"), default="auto",
                   help="auto: best count under the utility cap; all: every lowering row")
    p.add_argument("--max-utility-drop", type=float, default=0.05,
                   help="utility cap of policy auto (accuracy drop / relative MSE rise)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    if args.adult_dir:
        data = load_adult(args.adult_dir)
        rows = args.adult_rows or (2000 if args.quick else None)
        if rows:
            data = _subsample(data, rows, args.seed)
        regression, name, hidden, lam = False, "adult", 16 if args.quick else 64, 1e-3
    else:
        data = load_sklearn("diabetes", seed=args.seed)
        regression, name, hidden, lam = True, "diabetes", 4 if args.quick else 32, 1e-2
    with common.connect(args) as client:
        run(client, data, regression=regression, hidden=hidden, lam=lam, seed=args.seed,
            out=args.out, dataset_name=name, policy=args.policy,
            max_drop=args.max_utility_drop)
    return 0


def _subsample(data: TabularSplit, n: int, seed: int) -> TabularSplit:
    rng = np.random.default_rng(seed)
    tr = rng.permutation(len(data.y_train))[:n]
    te = rng.permutation(len(data.y_test))[: n // 2]
    assert data.s_train is not None and data.s_test is not None
    return TabularSplit(data.X_train[tr], data.y_train[tr], data.X_test[te], data.y_test[te],
                        data.s_train[tr], data.s_test[te], data.feature_names)


if __name__ == "__main__":
    sys.exit(main())
