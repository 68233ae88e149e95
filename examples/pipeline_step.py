"""A CI/pipeline gate: unlearn for fairness, fail the step if the model is still unfair.

Registers a model and its training set, submits a `fairness` job with `unlearn=true`,
waits, and exits 1 when the fairness metric after unlearning is above --threshold
(0 when at or below it; 2 when the job itself failed). The unlearned model's id is
printed so a later step can fetch it (`afif models download ID -o model.safetensors`).

Inputs: --weights FILE.safetensors with --architecture FILE.json (engine format) and
--data FILE.npz (arrays X, y, sensitive); without them, a logistic regression on
scikit-learn's breast_cancer (group = "mean texture" above the median, as in the demo).
Writes pipeline_step.png (metric before/after vs threshold) and pipeline_step.md.
"""

from __future__ import annotations

import json
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
from examples import common  # noqa: E402

FIG_SIZE = (5.0, 4.0)  # inches; 500 x 400 pixels at FIG_DPI
FIG_DPI = 100
EXIT_PASS, EXIT_ABOVE, EXIT_JOB = 0, 1, 2


def default_inputs(seed: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A fitted logistic regression and its training data (breast_cancer)."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    X = data.data
    j = list(data.feature_names).index("mean texture")
    s = (X[:, j] > np.median(X[:, j])).astype(np.int64)
    X = ((X - X.mean(0)) / X.std(0)).astype(np.float32)
    y = data.target.astype(np.int64)
    lam = 1e-2
    torch.manual_seed(seed)
    module = common.fit(torch.nn.Sequential(torch.nn.Linear(X.shape[1], 1)), X, y,
                        family="bernoulli", lam=lam, exclude=["0.bias"])
    model = {"module": module, "family": "bernoulli",
             "regularizer": {"kind": "l2", "strength": lam, "exclude": ["0.bias"]}}
    return model, {"X": X, "y": y, "sensitive": s}


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.splitlines()[0], "pipeline_step")
    p.add_argument("--threshold", type=float, default=0.38,
                   help="largest acceptable metric after unlearning")
    p.add_argument("--metric", choices=("demographic_parity", "chi2"),
                   default="demographic_parity")
    p.add_argument("--weights", type=Path, help="model weights (.safetensors)")
    p.add_argument("--architecture", type=Path, help="model architecture (.json)")
    p.add_argument("--family", default="bernoulli")
    p.add_argument("--regularizer", default='{"kind": "l2", "strength": 0.01}',
                   help="JSON regularizer of --weights")
    p.add_argument("--data", type=Path, help=".npz with X, y, sensitive")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    if args.weights or args.architecture or args.data:
        if not (args.weights and args.architecture and args.data):
            p.error("--weights, --architecture and --data go together")
        model_in: dict[str, Any] = {
            "architecture": json.loads(args.architecture.read_text()),
            "weights": args.weights, "family": args.family,
            "regularizer": json.loads(args.regularizer)}
        with np.load(args.data, allow_pickle=False) as npz:
            data = {k: npz[k] for k in ("X", "y", "sensitive")}
    else:
        model_in, data = default_inputs(args.seed)

    with common.connect(args) as client:
        return gate(client, model_in, data, args.metric, args.threshold, args.out)


def gate(client: Client, model_in: dict[str, Any], data: dict[str, np.ndarray], metric: str,
         threshold: float, out: Path) -> int:
    """Register, submit, wait; the exit status of the step."""
    if "module" in model_in:
        model = client.register_model(model_in["module"], family=model_in["family"],
                                      regularizer=model_in["regularizer"],
                                      name="pipeline-model")
    else:
        model = client.register_model(model_in["architecture"], weights=model_in["weights"],
                                      family=model_in["family"],
                                      regularizer=model_in["regularizer"],
                                      name="pipeline-model")
    train = client.register_dataset(data["X"], data["y"], sensitive=data["sensitive"],
                                    name="pipeline-train")
    job = client.submit("fairness", model=model, dataset=train, metric=metric, unlearn=True)
    job.wait(progress=True, raise_on_failure=False)
    if job.status != "succeeded":
        message = job.error.message if job.error else job.status
        print(f"FAIL: fairness job {job.id} {job.status}: {message}", file=sys.stderr)
        return EXIT_JOB

    res = job.result()
    before, after = float(res["metric_before"]), float(res["metric_after"])
    passed = after <= threshold
    verdict = "PASS" if passed else "FAIL"
    table = common.markdown_table(
        ["metric", "before", "after", "threshold", "rows unlearned", "unlearned model",
         "verdict"],
        [[metric, before, after, threshold, int(res["n_removed"]), res.get("model_id") or "-",
          verdict]])
    print(table)
    _plot(before, after, threshold, metric, out / "pipeline_step.png")
    common.write_outputs(out, "pipeline_step", table, {
        "metric": metric, "before": before, "after": after, "threshold": threshold,
        "n_removed": int(res["n_removed"]), "model_id": res.get("model_id"),
        "passed": passed, "job_id": job.id}, f"# Pipeline gate on {metric}")
    print(f"{verdict}: {metric} after unlearning {after:.4f} "
          f"{'<=' if passed else '>'} threshold {threshold}")
    return EXIT_PASS if passed else EXIT_ABOVE


def _plot(before: float, after: float, threshold: float, metric: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=FIG_SIZE, dpi=FIG_DPI)
    ax.bar(["before", "after unlearning"], [before, after], color=["tab:gray", "tab:blue"])
    ax.axhline(threshold, color="red", ls="--", label=f"threshold {threshold}")
    ax.set_ylabel(metric)
    ax.legend()
    common.save_figure(fig, path, FIG_DPI)


if __name__ == "__main__":
    sys.exit(main())
