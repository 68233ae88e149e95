"""End-to-end tour of afif over HTTP, run by `make demo` (about a minute on 2 cores).

1. Starts a private stack (`afif up` on a free port, data in a temporary folder) and
   creates an API key with `afif keys create`.
2. Trains an L2 logistic regression on scikit-learn's breast_cancer data.
3. Registers the model and the data through the Python client.
4. Runs each job kind (attribution, unlearning, fairness, cv) and prints the results,
   each beside an exact answer from retraining with scikit-learn.
5. Stops the stack.

The sensitive attribute. breast_cancer has no demographic column, so the demo makes
one: patients whose "mean texture" (grey-level spread of the scan) is above the
median form group 1. Think of it as a proxy for which imaging site produced the scan,
an attribute the diagnosis should not depend on. Texture is mildly predictive of the
label, so the model's positive rate differs between the groups and the demographic
parity gap is far from zero: the fairness job has something to find.

Use `--url URL --key KEY` to run against a stack that is already up.
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
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client import Client, Job  # noqa: E402
from client.stack import LocalStack  # noqa: E402

C = 1.0  # scikit-learn's inverse regularization; the engine's λ is 1/(n·C)
SENSITIVE_FEATURE = "mean texture"


def load_data(seed: int = 0) -> dict[str, np.ndarray]:
    """Standardized breast_cancer split 80/20, with the derived binary group."""
    data = load_breast_cancer()
    X, y = data.data, data.target.astype(np.int64)
    j = list(data.feature_names).index(SENSITIVE_FEATURE)
    group = (X[:, j] > np.median(X[:, j])).astype(np.int64)
    X_tr, X_te, y_tr, y_te, s_tr, s_te = train_test_split(
        X, y, group, test_size=0.2, random_state=seed, stratify=y
    )
    scaler = StandardScaler().fit(X_tr)
    return {
        "X_tr": scaler.transform(X_tr).astype(np.float32), "y_tr": y_tr, "s_tr": s_tr,
        "X_te": scaler.transform(X_te).astype(np.float32), "y_te": y_te, "s_te": s_te,
    }


def fit_logreg(X: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None
               ) -> LogisticRegression:
    """sklearn fit of C·Σ w_i ℓ_i + ½‖coef‖² (intercept unpenalized), to high precision."""
    model = LogisticRegression(C=C, tol=1e-12, max_iter=10_000)
    return model.fit(X.astype(np.float64), y, sample_weight=weights)


def theta(model: LogisticRegression) -> np.ndarray:
    """Parameters as one vector [coef..., intercept]."""
    return np.concatenate([model.coef_.ravel(), model.intercept_])


def to_module(model: LogisticRegression) -> torch.nn.Sequential:
    """The same classifier as a torch module emitting the logit (bernoulli family)."""
    linear = torch.nn.Linear(model.coef_.shape[1], 1)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(model.coef_, dtype=torch.float32))
        linear.bias.copy_(torch.tensor(model.intercept_, dtype=torch.float32))
    return torch.nn.Sequential(linear)


def mean_logloss(model: LogisticRegression, X: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(model.predict_proba(X.astype(np.float64))[:, 1], 1e-12, 1 - 1e-12)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def without(n: int, rows: np.ndarray) -> np.ndarray:
    """Sample weights of the leave-`rows`-out objective (1/n normalization is kept)."""
    w = np.ones(n)
    w[rows] = 0.0
    return w


def heading(text: str) -> None:
    print(f"\n== {text} " + "=" * max(0, 72 - len(text)))


def run(client: Client) -> None:
    d = load_data()
    n = len(d["y_tr"])
    erm = fit_logreg(d["X_tr"], d["y_tr"])
    acc = erm.score(d["X_te"], d["y_te"])
    heading("model")
    print(f"logistic regression on {n} training rows, 30 features, C={C} "
          f"(λ = 1/(n·C) = {1 / (n * C):.2e}); test accuracy {acc:.3f}")

    t0 = time.perf_counter()
    model = client.register_model(
        to_module(erm), family="bernoulli", name="breast-cancer-logreg",
        regularizer={"kind": "l2", "strength": 1.0 / (n * C), "exclude": ["0.bias"]},
    )
    train = client.register_dataset(d["X_tr"], d["y_tr"], sensitive=d["s_tr"],
                                    name="breast-cancer-train")
    test = client.register_dataset(d["X_te"], d["y_te"], name="breast-cancer-test")
    print(f"registered model {model.id} ({model.n_parameters} parameters), "
          f"train {train.id} ({train.n_rows} rows), test {test.id} ({test.n_rows} rows) "
          f"in {time.perf_counter() - t0:.2f}s")

    # --- attribution ------------------------------------------------------------------
    heading("attribution: which training rows matter for the mean test loss")
    job = client.submit("attribution", model=model, dataset=train, test_dataset=test, top_k=5)
    res = _outcome(job)
    scores = np.asarray(res["scores"], dtype=np.float64)
    order = np.argsort(scores)
    print(f"job {job.id}: {job.status} in {_total(job)}; convention: "
          f"{res.get('convention', 'removal')} (score = change in mean test loss if the "
          f"row is removed)")
    base = mean_logloss(erm, d["X_te"], d["y_te"])
    print("  row   label  predicted Δloss   retrained Δloss")
    for i in list(order[-3:][::-1]) + list(order[:3]):
        actual = mean_logloss(fit_logreg(d["X_tr"], d["y_tr"], without(n, np.array([i]))),
                              d["X_te"], d["y_te"]) - base
        kind = "helpful" if scores[i] > 0 else "harmful"
        print(f"  {i:4d}  {d['y_tr'][i]:5d}  {scores[i]:+15.2e}   {actual:+15.2e}  ({kind})")
    rho = _spearman(scores[order[-20:]], [
        mean_logloss(fit_logreg(d["X_tr"], d["y_tr"], without(n, np.array([i]))),
                     d["X_te"], d["y_te"]) - base for i in order[-20:]])
    print(f"  Spearman(predicted, retrained) over the 20 most helpful rows: {rho:.3f}")

    # --- unlearning -------------------------------------------------------------------
    heading("unlearning: remove the 10 most harmful rows without retraining")
    remove = np.sort(order[:10])
    job = client.submit("unlearning", model=model, dataset=train, remove=remove.tolist())
    res = _outcome(job)
    new = client.download_model(res["model_id"])
    theta_new = torch.cat([p.detach().double().ravel() for p in new.parameters()]).numpy()
    retrained = fit_logreg(d["X_tr"], d["y_tr"], without(n, remove))
    theta_star, theta_hat = theta(retrained), theta(erm)
    print(f"job {job.id}: {job.status} in {_total(job)}; new model {res['model_id']} "
          f"(parent {client.get_model(res['model_id']).parent_id})")
    print(f"  removed {res['n_removed']} rows; ‖θ̃ − θ̂‖ = {res['parameter_change_norm']:.4f}")
    print(f"  distance to exact retraining: before {np.linalg.norm(theta_hat - theta_star):.2e}"
          f", after one step {np.linalg.norm(theta_new - theta_star):.2e}")
    print(f"  test loss: original {base:.4f}, unlearned {_torch_loss(new, d):.4f}, "
          f"retrained {mean_logloss(retrained, d['X_te'], d['y_te']):.4f}")

    # Further Newton steps on the weighted objective (refine_steps) close the remaining gap.
    job = client.submit("unlearning", model=model, dataset=train, remove=remove.tolist(),
                        refine_steps=2)
    refined = client.download_model(_outcome(job)["model_id"])
    theta_ref = torch.cat([p.detach().double().ravel() for p in refined.parameters()]).numpy()
    print(f"  with refine_steps=2 (job {job.id[:8]}, {_total(job)}): distance to exact "
          f"retraining {np.linalg.norm(theta_ref - theta_star):.2e} (float32 weights)")

    # --- fairness ---------------------------------------------------------------------
    heading(f"fairness: demographic parity between '{SENSITIVE_FEATURE}' groups")
    job = client.submit("fairness", model=model, dataset=train,
                        metric="demographic_parity", unlearn=True)
    res = _outcome(job)
    print(f"job {job.id}: {job.status} in {_total(job)}")
    print(f"  parity gap  {res['metric_before']:.4f} -> {res['metric_after']:.4f}")
    if "accuracy_before" in res:
        print(f"  accuracy    {res['accuracy_before']:.4f} -> {res['accuracy_after']:.4f} "
              "(training set)")
    print(f"  unlearned {res['n_removed']} rows" +
          (f" into model {res['model_id']}" if res.get("model_id") else ""))
    if res.get("model_id"):
        fair = client.download_model(res["model_id"])
        print(f"  on the test set: gap {_gap(erm_module := to_module(erm), d):.4f} -> "
              f"{_gap(fair, d):.4f}, accuracy {_acc(erm_module, d):.4f} -> {_acc(fair, d):.4f}")

    # --- cross-validation -------------------------------------------------------------
    heading("approximate 5-fold cross-validation (no retraining)")
    job = client.submit("cv", model=model, dataset=train, folds=5, seed=0)
    res = _outcome(job)
    print(f"job {job.id}: {job.status} in {_total(job)}")
    exact = []
    print("  fold  rows  approx loss  retrained loss")
    for f, fold in enumerate(res["per_fold"]):
        idx = np.asarray(fold["indices"], dtype=np.int64)
        refit = fit_logreg(d["X_tr"], d["y_tr"], without(n, idx))
        exact.append(mean_logloss(refit, d["X_tr"][idx], d["y_tr"][idx]))
        print(f"  {f:4d}  {len(idx):4d}  {fold['loss']:11.4f}  {exact[-1]:14.4f}")
    print(f"  estimate {res['estimate']:.4f}, exact retrained CV {np.mean(exact):.4f}, "
          f"test loss {base:.4f}")


def _outcome(job: Job) -> dict[str, Any]:
    """Wait for the job and return its result, first printing any warning the engine gave
    (a model far from its optimum, a solve that did not converge)."""
    res = job.wait(progress=True).result()
    for warning in res.get("warnings") or []:
        print(f"  warning: {warning}")
    return res


def _total(job: object) -> str:
    timings = getattr(job, "timings", None) or {}
    return f"{sum(timings.values()):.2f}s" if timings else "-"


def _spearman(a: np.ndarray, b: list[float]) -> float:
    ra = np.argsort(np.argsort(a))
    rb = np.argsort(np.argsort(np.asarray(b)))
    return float(np.corrcoef(ra, rb)[0, 1])


def _probs(module: torch.nn.Module, X: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.sigmoid(module(torch.as_tensor(X)).double()).numpy().ravel()


def _torch_loss(module: torch.nn.Module, d: dict[str, np.ndarray]) -> float:
    p = np.clip(_probs(module, d["X_te"]), 1e-12, 1 - 1e-12)
    y = d["y_te"]
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def _gap(module: torch.nn.Module, d: dict[str, np.ndarray]) -> float:
    p, s = _probs(module, d["X_te"]), d["s_te"]
    return float(abs(p[s == 1].mean() - p[s == 0].mean()))


def _acc(module: torch.nn.Module, d: dict[str, np.ndarray]) -> float:
    return float(np.mean((_probs(module, d["X_te"]) > 0.5) == d["y_te"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="use a running stack instead of starting one")
    parser.add_argument("--key", help="API key for --url")
    parser.add_argument("--data-dir", help="data folder of the stack this demo starts "
                        "(default: a temporary folder)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    start = time.perf_counter()
    if args.url:
        with Client(args.url, args.key) as client:
            run(client)
    else:
        print("starting the stack (afif up) ...", flush=True)
        with LocalStack(args.data_dir, tenant="demo") as stack:
            print(f"stack up at {stack.url} in {time.perf_counter() - start:.1f}s; "
                  f"key for tenant 'demo' created")
            with stack.client() as client:
                run(client)
            print("\nstopping the stack ...")
    print(f"demo finished in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
