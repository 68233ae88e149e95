"""Shared plumbing of the examples: connecting (or starting a stack), training, tables.

Training here is the examples' own full-batch L-BFGS on the weighted objective the
service assumes, (1/n) Σ w_i ℓ_i + λ·½‖θ‖² over the penalized parameters; it shares no
code with the engine, so an "exact retrained" line is an independent check.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from client import Client
from client.stack import LocalStack

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPO = Path(__file__).resolve().parents[1]


def parser(description: str, name: str) -> argparse.ArgumentParser:
    """Arguments every example takes: --url/--key (else start a stack), --quick, --out."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--url", help="a running afif server (default: start one with `afif up`)")
    p.add_argument("--key", help="API key for --url (default $AFIF_API_KEY)")
    p.add_argument("--quick", action="store_true", help="small sizes, for CI (seconds)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "examples" / name,
                   help="folder for the PNG plots and the markdown table")
    p.add_argument("--seed", type=int, default=0)
    return p


@contextlib.contextmanager
def connect(args: argparse.Namespace) -> Iterator[Client]:
    """A client for --url/--key, or for a private stack started for this run."""
    if args.url:
        with Client(args.url, args.key) as client:
            yield client
        return
    print("starting a private afif stack ...", flush=True)
    with LocalStack(tenant="examples") as stack, stack.client() as client:
        print(f"stack up at {stack.url}")
        yield client


def loss_fn(family: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(n,) per-row losses of the exponential family, as the service defines them."""
    if family == "bernoulli":
        f = out.reshape(-1)
        return torch.nn.functional.binary_cross_entropy_with_logits(f, y.to(f.dtype),
                                                                    reduction="none")
    if family == "categorical":
        return torch.nn.functional.cross_entropy(out, y.long(), reduction="none")
    if family == "gaussian":
        r = out.reshape(-1) - y.to(out.dtype)
        return 0.5 * r * r
    raise ValueError(f"family {family!r} is not used by the examples")


def penalized(module: torch.nn.Module, exclude: Sequence[str]) -> list[torch.Tensor]:
    return [p for n, p in module.named_parameters() if n not in exclude]


def fit(
    module: torch.nn.Module,
    X: np.ndarray,
    y: np.ndarray,
    *,
    family: str,
    lam: float,
    exclude: Sequence[str] = (),
    weights: np.ndarray | None = None,
    max_iter: int = 500,
    tol: float = 1e-10,
) -> torch.nn.Module:
    """Minimize (1/n) Σ w_i ℓ_i + λ·½‖θ‖² by full-batch L-BFGS in float64, in place.

    Returns the module in float32 again. `weights` default to 1 (w_i = 0 removes a row
    and keeps the 1/n).
    """
    module.double().train(False)
    Xt = torch.as_tensor(X, dtype=torch.float64)
    yt = torch.as_tensor(y)
    w = torch.ones(len(y), dtype=torch.float64) if weights is None else torch.as_tensor(
        weights, dtype=torch.float64)
    params = list(module.parameters())
    opt = torch.optim.LBFGS(params, lr=1, max_iter=max_iter, tolerance_grad=tol,
                            tolerance_change=1e-14, history_size=20,
                            line_search_fn="strong_wolfe")
    reg = penalized(module, exclude)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (w * loss_fn(family, module(Xt), yt)).sum() / len(w)
        loss = loss + 0.5 * lam * sum((p * p).sum() for p in reg)
        loss.backward()
        return loss

    opt.step(closure)
    return module.float()


def mean_loss(module: torch.nn.Module, X: np.ndarray, y: np.ndarray, family: str) -> float:
    with torch.no_grad():
        out = module(torch.as_tensor(X, dtype=torch.float32)).double()
        return float(loss_fn(family, out, torch.as_tensor(y)).mean())


def predictions(module: torch.nn.Module, X: np.ndarray) -> np.ndarray:
    """(n, K) raw outputs (logits / means) as float64."""
    with torch.no_grad():
        return module(torch.as_tensor(X, dtype=torch.float32)).double().numpy()


def job_seconds(job: Any) -> float:
    """Engine seconds of a finished job (sum of its phase timings, loading included)."""
    return float(sum((job.timings or {}).values()))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, name: str, table: str, summary: dict[str, Any], intro: str
                  ) -> None:
    """Write <out>/<name>.md (intro + table) and <out>/<name>.json (numbers)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(f"{intro.strip()}\n\n{table}")
    (out / f"{name}.json").write_text(json.dumps(summary, indent=2, default=float))
    print(f"\nwrote {out / (name + '.md')} and {out / (name + '.json')}")


class Stopwatch:
    """`with Stopwatch() as sw: ...; sw.seconds`."""

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def save_figure(fig: Figure, path: Path, dpi: int, tight: bool = True) -> None:
    """Write `fig` as a PNG at `path` (folders made as needed) and release it; `tight`
    applies tight_layout first (off for figures laid out by hand to an exact size)."""
    import matplotlib.pyplot as plt

    if tight:
        fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
