"""One table from job kind to engine task: how a job's params become engine arguments.

Each runner takes the job's validated params, the loaded inputs and a progress callback,
and returns the engine's TaskResult plus the training rows a new model forgets (None
when the job makes no model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.errors import SpecError
from engine.results import TaskResult
from service.settings import get_settings

ProgressFn = Callable[[str, int, int], None]


@dataclass
class Inputs:
    """What a job computes on: the model's Problem (training set inside) and extra data.

    test_X / test_y: the attribution test set (rows selected by `test_indices`).
    sensitive: (n,) group labels of the training rows, for fairness.
    """

    problem: Any
    job_id: str = ""
    test_X: np.ndarray | None = None
    test_y: np.ndarray | None = None
    sensitive: np.ndarray | None = None


@dataclass
class KindOutcome:
    result: TaskResult
    removed: list[int] | None


def _solver_args(params: Any) -> dict[str, Any]:
    return {
        "method": params.method,
        "solver": params.solver,
        "solver_options": dict(params.solver_options) or None,
    }


def run_unlearning(params: Any, inputs: Inputs, progress: ProgressFn) -> KindOutcome:
    """Remove `params.remove` from the training set; the new model forgets those rows.

    The contract's `solver` diagnostics are the engine's curvature summary (method,
    damping, and one report per linear solve).
    """
    result = engine_tasks().unlearn(
        inputs.problem,
        list(params.remove),
        refine_steps=params.refine_steps,
        progress=progress,
        **_solver_args(params),
    )
    if "solver" not in result.values and "curvature" in result.values:
        result.values["solver"] = result.values.pop("curvature")
    return KindOutcome(result, removed=sorted(int(i) for i in params.remove))


def run_attribution(params: Any, inputs: Inputs, progress: ProgressFn) -> KindOutcome:
    """Removal-convention scores of every training row on the mean test loss.

    The HTTP contract's `scores` is per training row (n,): the engine's `mean_scores`.
    The engine's per-test-row matrix (n, m) is kept as `scores_per_test`.
    """
    if inputs.test_X is None or inputs.test_y is None:
        raise SpecError("test_dataset_id: an attribution job needs a test dataset")
    result = engine_tasks().attribute(
        inputs.problem,
        _tensor(inputs.test_X),
        _tensor(inputs.test_y),
        top_k=params.top_k,
        progress=progress,
        **_solver_args(params),
    )
    arrays = dict(result.arrays)
    if "mean_scores" in arrays:
        arrays["scores_per_test"] = arrays.pop("scores")
        arrays["scores"] = arrays.pop("mean_scores")
    result.arrays = arrays
    return KindOutcome(result, removed=None)


def run_fairness(params: Any, inputs: Inputs, progress: ProgressFn) -> KindOutcome:
    """Fairness influence; with `unlearn`, the rows removed make a new model."""
    if inputs.sensitive is None:
        raise SpecError("dataset_id: a fairness job needs a dataset with a 'sensitive' column")
    result = engine_tasks().fairness(
        inputs.problem,
        _tensor(inputs.sensitive),
        metric=params.metric,
        unlearn=params.unlearn,
        policy=params.policy,
        max_fraction=params.max_fraction,
        max_accuracy_drop=params.max_accuracy_drop,
        progress=progress,
        **_solver_args(params),
    )
    # A new model only when rows were actually unlearned (the policy may remove none).
    removed = None
    if params.unlearn and result.parameters is not None:
        rows = result.arrays.get("removed", result.values.get("removed", []))
        removed = sorted(int(i) for i in np.asarray(rows).ravel()) or None
    return KindOutcome(result, removed=removed)


def run_cv(params: Any, inputs: Inputs, progress: ProgressFn) -> KindOutcome:
    """Approximate leave-k-out cross-validation.

    The engine gives all folds' rows concatenated (`folds`) with `fold_starts` and
    `fold_losses`; the HTTP contract lists `per_fold` entries with `indices` and `loss`.
    """
    result = engine_tasks().cross_validate(
        inputs.problem,
        k=params.k,
        folds=params.folds,
        seed=params.seed,
        progress=progress,
        **_solver_args(params),
    )
    result.values["per_fold"] = per_fold(result.arrays, get_settings().inline_max, inputs.job_id)
    return KindOutcome(result, removed=None)


def per_fold(arrays: dict[str, np.ndarray], inline_max: int, job_id: str) -> list[dict[str, Any]]:
    """One entry per fold: its `loss`, `size` and held-out row `indices`.

    A fold larger than `inline_max` rows gets its indices as an artifact of its own,
    `fold_<j>_indices`, referenced the way the service references every artifact;
    smaller folds list them inline.
    """
    rows = np.asarray(arrays["folds"]).ravel()
    starts = [int(s) for s in np.asarray(arrays["fold_starts"]).ravel()]
    losses = np.asarray(arrays["fold_losses"], dtype=np.float64).ravel()
    stops = starts[1:] + [len(rows)]
    entries = []
    for j, (start, stop, loss) in enumerate(zip(starts, stops, losses, strict=True)):
        held = rows[start:stop].astype(np.int64)
        entry: dict[str, Any] = {"loss": float(loss), "size": int(stop - start)}
        if held.size <= inline_max:
            entry["indices"] = [int(i) for i in held]
        else:
            name = f"fold_{j}_indices"
            arrays[name] = held
            entry["indices"] = {
                "artifact": f"/v1/jobs/{job_id}/artifacts/{name}",
                "shape": [int(held.size)],
                "dtype": "int64",
            }
        entries.append(entry)
    return entries


def with_convergence(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with top-level `converged` (bool) and `max_relative_residual` (float | None).

    The engine's own flags win; otherwise they are derived from every solve report
    (SolveReport / ProxReport dicts, found anywhere below the top level): converged when
    all reports say so (True when no solve ran), and the largest relative residual ‖Cx − v‖/‖v‖
    over the reports that have one (None when one is missing or not finite, or none ran).
    """
    out = dict(values)
    if "converged" in out and "max_relative_residual" in out:
        out["converged"] = bool(out["converged"])
        return out

    reports = [r for value in values.values() for r in _solve_reports(value)]
    residuals = [r["relative_residual"] for r in reports if "relative_residual" in r]
    finite = [float(r) for r in residuals
              if isinstance(r, (int, float)) and np.isfinite(float(r))]
    out.setdefault("converged", all(bool(r["converged"]) for r in reports))
    out.setdefault(
        "max_relative_residual",
        max(finite) if finite and len(finite) == len(residuals) else None,
    )
    return out


def _solve_reports(value: Any) -> list[dict[str, Any]]:
    """Dicts that look like solve reports (a boolean `converged`) inside `value`."""
    if isinstance(value, dict):
        found = [value] if isinstance(value.get("converged"), bool) else []
        return found + [r for inner in value.values() for r in _solve_reports(inner)]
    if isinstance(value, (list, tuple)):
        return [r for inner in value for r in _solve_reports(inner)]
    return []


RUNNERS: dict[str, Callable[[Any, Inputs, ProgressFn], KindOutcome]] = {
    "unlearning": run_unlearning,
    "attribution": run_attribution,
    "fairness": run_fairness,
    "cv": run_cv,
}


def engine_tasks() -> Any:
    import engine.tasks

    return engine.tasks


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))
