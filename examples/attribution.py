"""Which training images explain a model's worst test predictions? Fisher beside Hessian.

A small CNN (conv 3x3 → SeLU → max-pool → linear) is trained on two digit classes of
scikit-learn's 8x8 digits. For the test images with the highest loss, one attribution
job per curvature (Fisher, Hessian) scores every training image by the change in that
test image's loss if the training image were removed (removal convention: positive =
helpful, the loss would rise without it; negative = harmful). The grid shows each
test image with its most helpful and most harmful training images under both methods;
the table gives their rank agreement.

Writes attribution.png (image grid), attribution_agreement.png and attribution.md.
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
from scipy.stats import spearmanr  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client import Client  # noqa: E402
from examples import common  # noqa: E402

CLASSES = (3, 8)
SHOW = 3  # helpful and harmful images shown per test image and method
CELL_INCHES = 1.0  # one grid cell; the grid is (1 + 4·SHOW) cells wide, m tall
GRID_DPI = 80
AGREE_SIZE = (6.0, 4.0)  # inches of the agreement plot, at GRID_DPI
LAM = 1e-3


def load(seed: int, max_train: int | None = None) -> dict[str, np.ndarray]:
    digits = load_digits()
    keep = np.isin(digits.target, CLASSES)
    X = (digits.images[keep] / 16.0).astype(np.float32)[:, None]  # (n, 1, 8, 8)
    y = (digits.target[keep] == CLASSES[1]).astype(np.int64)  # class index 0 or 1
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.3, random_state=seed,
                                              stratify=y)
    if max_train is not None:
        X_tr, y_tr = X_tr[:max_train], y_tr[:max_train]
    return {"X_tr": X_tr, "y_tr": y_tr, "X_te": X_te, "y_te": y_te}


def cnn(seed: int, channels: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, channels, kernel_size=3, padding=1), torch.nn.SELU(),
        torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(channels * 16, 2),
    )


def run(client: Client, *, n_test: int, channels: int, seed: int, out: Path,
        max_train: int | None = None) -> dict[str, Any]:
    d = load(seed, max_train)
    with common.Stopwatch() as sw:
        module = common.fit(cnn(seed, channels), d["X_tr"], d["y_tr"], family="categorical",
                            lam=LAM)
    test_losses = _losses(module, d["X_te"], d["y_te"])
    worst = np.argsort(-test_losses)[:n_test]
    acc = float(np.mean(common.predictions(module, d["X_te"]).argmax(1) == d["y_te"]))
    print(f"digits {CLASSES[0]} vs {CLASSES[1]}: {len(d['y_tr'])} train / {len(d['y_te'])} "
          f"test images, CNN with {sum(p.numel() for p in module.parameters())} parameters, "
          f"trained in {sw.seconds:.1f}s, test accuracy {acc:.3f}")

    model = client.register_model(module, family="categorical", name="digits-cnn",
                                  regularizer={"kind": "l2", "strength": LAM},
                                  input_shape=(1, 8, 8))
    train = client.register_dataset(d["X_tr"], d["y_tr"], name="digits-train")
    test = client.register_dataset(d["X_te"], d["y_te"], name="digits-test")
    results: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    for method in ("fisher", "hessian"):
        job = client.submit("attribution", model=model, dataset=train, test_dataset=test,
                            test_indices=worst.tolist(), top_k=SHOW, method=method)
        results[method] = job.wait(progress=True).result()
        seconds[method] = common.job_seconds(job)
        print(f"{method}: job {job.id} {seconds[method]:.2f}s")

    F = np.asarray(results["fisher"]["scores_per_test"], dtype=np.float64)  # (n, m)
    H = np.asarray(results["hessian"]["scores_per_test"], dtype=np.float64)
    rows = []
    for j, t in enumerate(worst):
        rho = float(spearmanr(F[:, j], H[:, j]).statistic)
        top_f, top_h = _top(F[:, j], SHOW * 3), _top(H[:, j], SHOW * 3)
        rows.append({
            "test_index": int(t), "label": int(CLASSES[d["y_te"][t]]),
            "loss": float(test_losses[t]), "spearman": rho,
            "top_overlap": len(top_f & top_h) / len(top_f),
            "max_gap_rel": float(np.abs(F[:, j] - H[:, j]).max() / np.abs(H[:, j]).max()),
        })
    table = common.markdown_table(
        ["test image", "label", "loss", "Spearman F vs H", f"top-{SHOW * 3} overlap",
         "max |F−H| / max |H|"],
        [[r["test_index"], r["label"], r["loss"], r["spearman"], r["top_overlap"],
          r["max_gap_rel"]] for r in rows])
    timing = common.markdown_table(["method", "engine seconds"],
                                   [[m, s] for m, s in seconds.items()])
    print("\n" + table + "\n" + timing)
    _grid(d, worst, results, out / "attribution.png")
    _agreement(F, H, out / "attribution_agreement.png")
    intro = (f"# Training-image attribution, digits {CLASSES[0]} vs {CLASSES[1]}\n\n"
             f"The {n_test} test images of highest loss; scores per test image in the "
             f"removal convention. Rank agreement of the Fisher and Hessian scores over "
             f"all {len(d['y_tr'])} training images, and the overlap of their "
             f"{SHOW * 3} largest-|score| sets.")
    summary = {"n_train": len(d["y_tr"]), "n_test_shown": n_test, "test_accuracy": acc,
               "seconds": seconds, "rows": rows}
    common.write_outputs(out, "attribution", table + "\n" + timing, summary, intro)
    return summary


def _losses(module: torch.nn.Module, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = module(torch.as_tensor(X)).double()
        return common.loss_fn("categorical", out, torch.as_tensor(y)).numpy()


def _top(scores: np.ndarray, k: int) -> set[int]:
    return set(np.argsort(-np.abs(scores))[:k].tolist())


def _grid(d: dict[str, np.ndarray], worst: np.ndarray, results: dict[str, dict[str, Any]],
          path: Path) -> None:
    cols = 1 + 4 * SHOW
    fig, axes = plt.subplots(len(worst), cols, squeeze=False,
                             figsize=(cols * CELL_INCHES, len(worst) * CELL_INCHES),
                             dpi=GRID_DPI)
    for j, t in enumerate(worst):
        panels = [(d["X_te"][t, 0], f"test {t}\ny={CLASSES[d['y_te'][t]]}", "black")]
        for method in ("fisher", "hessian"):
            res = results[method]
            for kind, color in (("helpful", "green"), ("harmful", "red")):
                for i in np.asarray(res[kind])[j][:SHOW]:
                    panels.append((d["X_tr"][i, 0],
                                   f"{method[0].upper()} {kind[:4]}\ny={CLASSES[d['y_tr'][i]]}",
                                   color))
        for ax, (img, title, color) in zip(axes[j], panels, strict=True):
            ax.imshow(img, cmap="gray_r", vmin=0, vmax=1)
            ax.set_title(title, fontsize=6, color=color)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.subplots_adjust(left=0.01, right=0.99, top=0.9, bottom=0.02, wspace=0.1, hspace=0.6)
    common.save_figure(fig, path, GRID_DPI, tight=False)


def _agreement(F: np.ndarray, H: np.ndarray, path: Path) -> None:
    fig, ax = plt.subplots(figsize=AGREE_SIZE, dpi=GRID_DPI)
    ax.scatter(H.ravel(), F.ravel(), s=4, alpha=0.5)
    lim = float(np.abs(np.concatenate([F.ravel(), H.ravel()])).max())
    ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.8)
    ax.set_xlabel("Hessian score")
    ax.set_ylabel("Fisher score")
    ax.set_title("per (training image, test image) scores")
    common.save_figure(fig, path, GRID_DPI)


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.splitlines()[0], "attribution")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    # --quick: fewer and smaller everything, so the Hessian's exact solve stays short.
    n_test, channels, max_train = (3, 2, 120) if args.quick else (10, 8, None)
    with common.connect(args) as client:
        run(client, n_test=n_test, channels=channels, seed=args.seed, out=args.out,
            max_train=max_train)
    return 0


if __name__ == "__main__":
    sys.exit(main())
