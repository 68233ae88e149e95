"""`workers.tasks.run_job` in-process on a real database, store and engine: outcomes,
error codes, the job id on every log line, and the bounded progress rate."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load

from service.db import session_scope
from service.domain import jobs as domain
from service.domain import submission
from service.models import Dataset, Job, Model, Tenant
from service.storage import get_store
from tests.integration.stack import (
    Fitted,
    distance,
    influence_step,
    make_fitted,
    npz_bytes,
    safetensors_bytes,
)
from workers import tasks
from workers.logcontext import JobIdFilter


@pytest.fixture(scope="module")
def fitted() -> Fitted:
    return make_fitted()


def make_job(fitted: Fitted, kind: str, params: dict[str, Any], weights: bytes | None = None,
             status: str = "queued", regularizer: dict[str, Any] | None = None) -> str:
    """Store the blobs, write tenant/model/dataset/job rows; returns the job id."""
    store = get_store()
    weights = weights or safetensors_bytes(fitted.coef, fitted.intercept)
    data = npz_bytes(X=fitted.X, y=fitted.y)
    model_blob, data_blob = store.put(weights), store.put(data)
    with session_scope() as session:
        tenant = Tenant(name=f"tenant-{np.random.default_rng().integers(1 << 30)}")
        session.add(tenant)
        session.flush()
        model = Model(
            tenant_id=tenant.id, name="logreg", family="bernoulli",
            architecture={"layers": [{"type": "linear", "in_features": 30, "out_features": 1}]},
            regularizer=regularizer or {"kind": "l2", "strength": fitted.strength,
                                        "exclude": ["0.bias"]},
            scope=None, n_parameters=31, sha256=model_blob.sha256, size_bytes=model_blob.size,
        )
        dataset = Dataset(
            tenant_id=tenant.id, name="train", n_rows=fitted.n, n_features=30,
            feature_shape=[30], y_dtype="int64", has_sensitive=False, source_format="npz",
            sha256=data_blob.sha256, size_bytes=data_blob.size,
        )
        session.add_all([model, dataset])
        session.flush()
        job = Job(tenant_id=tenant.id, kind=kind, model_id=model.id, dataset_id=dataset.id,
                  params=params, status=status)
        session.add(job)
        session.commit()
        return job.id


def row(job_id: str) -> Job:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def test_unlearning_job_succeeds_with_model_versions_and_timings(
    runtime: Path, fitted: Fitted
) -> None:
    remove = [3, 5, 8]
    job_id = make_job(fitted, "unlearning", {"remove": remove, "solver": "exact"})

    tasks.run_job(job_id)

    job = row(job_id)
    assert job.status == "succeeded", (job.error_code, job.error_message)
    assert job.attempts == 1 and job.device == "cpu"
    assert {"afif", "torch", "numpy"} <= set(job.versions or {})
    assert job.timings and job.timings["load"] >= 0
    with session_scope() as session:
        child = session.get(Model, job.result["model_id"])
        assert child is not None and child.removed_indices == remove
        tensors = load(get_store().get(child.sha256))
    new = (tensors["0.weight"].astype(np.float64).ravel(), float(tensors["0.bias"][0]))
    expected = influence_step(fitted, remove)
    assert distance(new, expected) < 1e-4 * distance((fitted.coef, fitted.intercept), expected)
    solves = job.result["solver"]["solves"]
    assert job.result["converged"] is True
    assert job.result["max_relative_residual"] == max(s["relative_residual"] for s in solves)


@pytest.mark.parametrize(("regularizer", "attribute", "expected"), [
    ({"kind": "elastic_net", "strength": 0.01, "l1_ratio": 0.25}, "l1_coefficient", 0.0025),
    ({"kind": "elastic_net", "strength": 0.01}, "l1_coefficient", 0.005),  # engine default
    ({"kind": "group_lasso", "strength": 0.01, "groups": [["0.weight", "0.bias"]]}, "groups",
     (("0.weight", "0.bias"),)),
    ({"kind": "group_lasso", "strength": 0.01, "exclude": ["0.bias"]}, "exclude", ("0.bias",)),
])
def test_regularizer_settings_reach_the_engine(
    runtime: Path, fitted: Fitted, regularizer: dict[str, Any], attribute: str, expected: Any
) -> None:
    job_id = make_job(fitted, "cv", {"folds": 2}, regularizer=regularizer)
    with session_scope() as session:
        job = domain.claim_job(session, job_id, "test")
    assert job is not None
    params = tasks.PARAMS_BY_KIND["cv"].model_validate(job.params)

    inputs = tasks.load_inputs(job, params, tasks.Beat(job_id, interval=60.0))

    penalty = inputs.problem.regularizer
    assert penalty.kind == regularizer["kind"]
    if isinstance(expected, float):
        assert getattr(penalty, attribute) == pytest.approx(expected, rel=1e-12)
    else:
        assert getattr(penalty, attribute) == expected


def test_leave_k_out_cv_matches_dense_influence_steps(runtime: Path, fitted: Fitted) -> None:
    # folds=None (HTTP null) with k=2: n/2 disjoint pairs cover every row once; each fold's
    # plug-in loss is its mean loss at θ̂ + (1/n) C⁻¹ Σ_S g_i, here in numpy float64.
    params = tasks.PARAMS_BY_KIND["cv"].model_validate({"k": 2, "folds": None,
                                                        "solver": "exact"})
    job_id = make_job(fitted, "cv", params.model_dump(mode="json"))

    tasks.run_job(job_id)

    job = row(job_id)
    assert job.status == "succeeded", (job.error_code, job.error_message)
    folds = job.result["per_fold"]
    held = np.array([fold["indices"] for fold in folds])
    assert held.shape == (fitted.n // 2, 2)
    assert sorted(held.ravel().tolist()) == list(range(fitted.n))

    n = fitted.n
    X = np.hstack([fitted.X.astype(np.float64), np.ones((n, 1))])
    theta = np.append(fitted.coef, fitted.intercept)
    p = 1.0 / (1.0 + np.exp(-(X @ theta)))
    penalty = np.diag(np.append(np.full(X.shape[1] - 1, fitted.strength), 0.0))
    curvature = (X.T * (p * (1 - p))) @ X / n + penalty
    gradients = (p - fitted.y)[:, None] * X
    sums = gradients[held[:, 0]] + gradients[held[:, 1]]
    thetas = theta + np.linalg.solve(curvature, sums.T).T / n  # row j: θ̃ without fold j
    z = np.einsum("jfd,jd->jf", X[held], thetas)
    expected = (np.logaddexp(0.0, z) - fitted.y[held] * z).mean(axis=1)
    losses = np.array([fold["loss"] for fold in folds])
    np.testing.assert_allclose(losses, expected, rtol=1e-4, atol=1e-6)
    assert job.result["estimate"] == pytest.approx(expected.mean(), rel=1e-4)


@pytest.mark.parametrize(("values", "converged", "worst"), [
    # Flags from the engine are kept.
    ({"converged": False, "max_relative_residual": 0.5, "solver": {"solves": []}}, False, 0.5),
    # Derived from solver reports wherever they sit.
    ({"solver": {"solves": [{"converged": True, "relative_residual": 1e-9},
                            {"converged": True, "relative_residual": 3e-8}]}}, True, 3e-8),
    ({"curvature": {"solves": [{"converged": True, "relative_residual": 1e-9}],
                    "prox": [{"converged": False, "relative_step": 0.1}]}}, False, 1e-9),
    ({"solver": {"solves": [{"converged": False, "relative_residual": None}]}}, False, None),
    ({"estimate": 0.3}, True, None),  # no solve ran
])
def test_results_carry_top_level_convergence(
    runtime: Path, fitted: Fitted, monkeypatch: pytest.MonkeyPatch,
    values: dict[str, Any], converged: bool, worst: float | None,
) -> None:
    from engine.results import TaskResult
    from workers import kinds

    def engine_said(*_: Any) -> Any:
        return kinds.KindOutcome(TaskResult(values=dict(values), arrays={}, parameters=None,
                                            timings={}, device="cpu"), removed=None)

    monkeypatch.setitem(kinds.RUNNERS, "cv", engine_said)
    job_id = make_job(fitted, "cv", {"folds": 2})

    tasks.run_job(job_id)

    result = row(job_id).result
    assert result is not None
    assert (result["converged"], result["max_relative_residual"]) == (converged, worst)


def test_weights_that_do_not_fit_fail_as_invalid_input(runtime: Path, fitted: Fitted) -> None:
    import torch
    from safetensors.torch import save

    wrong = save({"0.weight": torch.zeros(1, 29), "0.bias": torch.zeros(1)})
    job_id = make_job(fitted, "cv", {"folds": 2}, weights=wrong)

    tasks.run_job(job_id)

    job = row(job_id)
    assert (job.status, job.error_code) == ("failed", "invalid_input")
    assert "0.weight" in (job.error_message or "")


def test_diverging_solver_fails_with_its_residual(runtime: Path, fitted: Fitted) -> None:
    # A LiSSA scale far below the largest curvature eigenvalue makes the series blow up.
    job_id = make_job(fitted, "unlearning", {
        "remove": [0], "method": "hessian", "solver": "lissa",
        "solver_options": {"scale": 0.001, "depth": 2000, "batch_size": 400},
    })

    tasks.run_job(job_id)

    job = row(job_id)
    assert (job.status, job.error_code) == ("failed", "solver_diverged")
    assert "residual" in (job.error_message or "")


def test_non_finite_parameters_fail_as_a_numerical_error(
    runtime: Path, fitted: Fitted, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A solve that reports success but returns inf stands in for an overflow: the engine
    # then refuses the non-finite parameters with a plain EngineError (not Spec/Diverged).
    import torch

    from engine import solvers
    from engine import tasks as engine_tasks
    from engine.errors import EngineError, SolverDiverged, SpecError

    def infinite(op: Any, rhs: Any, *args: Any, **kwargs: Any) -> Any:
        report = solvers.SolveReport(solver="exact", relative_residual=0.0, converged=True)
        return torch.full_like(rhs, float("inf")), report

    monkeypatch.setattr(engine_tasks, "solve", infinite)
    job_id = make_job(fitted, "unlearning", {"remove": [0], "solver": "exact"})

    tasks.run_job(job_id)

    job = row(job_id)
    assert (job.status, job.error_code) == ("failed", "numerical_error"), job.error_message
    assert "non-finite" in (job.error_message or "")
    assert not issubclass(EngineError, (SpecError, SolverDiverged))


def test_lost_blob_fails_as_internal_error(runtime: Path, fitted: Fitted) -> None:
    job_id = make_job(fitted, "cv", {"folds": 2})
    with session_scope() as session:
        digest = session.get(Model, row(job_id).model_id).sha256
    get_store().delete(digest)

    tasks.run_job(job_id)

    job = row(job_id)
    assert (job.status, job.error_code) == ("failed", "internal_error")
    assert digest in (job.error_message or "")


def test_cancelled_or_finished_jobs_are_skipped(runtime: Path, fitted: Fitted) -> None:
    for status in ("cancelled", "succeeded", "running"):
        job_id = make_job(fitted, "cv", {"folds": 2}, status=status)
        tasks.run_job(job_id)
        job = row(job_id)
        assert (job.status, job.attempts) == (status, 0)


def test_every_log_line_of_a_job_carries_its_id(
    runtime: Path, fitted: Fitted, caplog: pytest.LogCaptureFixture
) -> None:
    job_id = make_job(fitted, "cv", {"folds": 2, "solver": "exact"})
    caplog.handler.addFilter(JobIdFilter())
    caplog.set_level(logging.DEBUG)

    tasks.run_job(job_id)

    assert row(job_id).status == "succeeded"
    assert caplog.records, "the job logged nothing"
    for record in caplog.records:
        assert record.job_id == job_id, record.getMessage()
        assert f"[job {job_id}]" in record.getMessage()


def test_progress_is_written_at_a_bounded_rate(
    runtime: Path, fitted: Fitted, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = make_job(fitted, "cv", {"folds": 2})
    with session_scope() as session:
        assert domain.claim_job(session, job_id, "test") is not None
    writes: list[tuple[str, int, int]] = []
    real = domain.set_progress

    def counting(session: Any, job: str, phase: str, done: int, total: int) -> Any:
        writes.append((phase, done, total))
        return real(session, job, phase, done, total)

    monkeypatch.setattr(domain, "set_progress", counting)
    now = [1000.0]  # a clock the test moves by hand
    beat = tasks.Beat(job_id, interval=60.0, clock=lambda: now[0])  # thread never started
    interval = tasks.PROGRESS_WRITE_INTERVAL_SECONDS

    for done in range(500):
        beat.progress("solve", done, 500)
    assert writes == [("solve", 0, 500)], "one write per PROGRESS_WRITE_INTERVAL_SECONDS"

    now[0] += 0.999 * interval
    beat.progress("solve", 500, 1000)
    assert len(writes) == 1
    now[0] += 0.002 * interval
    beat.progress("solve", 501, 1000)
    assert writes[-1] == ("solve", 501, 1000) and len(writes) == 2

    beat.progress("solve", 502, 1000)
    beat._write_progress()  # what the heartbeat thread does at its next beat
    assert writes[-1] == ("solve", 502, 1000)
    assert row(job_id).progress == {"phase": "solve", "done": 502, "total": 1000}


def test_cancel_request_stops_a_running_job(runtime: Path, fitted: Fitted) -> None:
    job_id = make_job(fitted, "cv", {"folds": 2})
    with session_scope() as session:
        domain.claim_job(session, job_id, "test")
        tenant_id = row(job_id).tenant_id
        submission.cancel_job(session, tenant_id, job_id, cancel_in_queue=lambda _: None)
    beat = tasks.Beat(job_id, interval=60.0)

    with pytest.raises(tasks.JobCancelled):
        beat.progress("solve", 1, 10)


def test_worker_that_lost_its_job_stops_without_touching_it(runtime: Path, fitted: Fitted) -> None:
    job_id = make_job(fitted, "cv", {"folds": 2})
    with session_scope() as session:
        domain.claim_job(session, job_id, "new-owner")
    beat = tasks.Beat(job_id, interval=60.0, owner="old-owner")

    with pytest.raises(tasks.JobLost):
        beat.progress("solve", 1, 10)
    job = row(job_id)
    assert (job.status, job.worker) == ("running", "new-owner")


def test_stopped_worker_hands_its_job_back_to_the_queue(
    runtime: Path, fitted: Fitted, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service import queue
    from workers import kinds

    def interrupted(*_: Any) -> Any:
        raise SystemExit  # what RQ's cold shutdown raises inside a running job

    monkeypatch.setitem(kinds.RUNNERS, "cv", interrupted)
    job_id = make_job(fitted, "cv", {"folds": 2})

    with pytest.raises(SystemExit):
        tasks.run_job(job_id)

    job = row(job_id)
    assert (job.status, job.attempts, job.enqueue_failed) == ("queued", 1, False)
    assert queue.get_queue().job_ids == [queue.rq_job_id(job_id)]


def test_a_lost_cold_shutdown_still_stops_the_job_at_its_next_progress_call(
    runtime: Path, fitted: Fitted, monkeypatch: pytest.MonkeyPatch
) -> None:
    # RQ's SystemExit can vanish inside a finalizer; the flag set by AfifWorker still stops
    # the job, which then goes back to the queue like any interrupted job.
    from service import queue
    from workers import runner

    monkeypatch.setattr(runner, "force_stop", threading.Event())
    runner.force_stop.set()
    job_id = make_job(fitted, "cv", {"folds": 2})

    with pytest.raises(SystemExit):
        tasks.run_job(job_id)

    job = row(job_id)
    assert (job.status, job.attempts) == ("queued", 1)
    assert queue.get_queue().job_ids == [queue.rq_job_id(job_id)]


def test_afif_worker_flags_a_cold_shutdown_but_not_an_ignored_second_signal(
    runtime: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from datetime import UTC, datetime, timedelta

    from service import queue
    from workers import runner

    monkeypatch.setattr(runner, "force_stop", threading.Event())
    worker = runner.AfifWorker([queue.get_queue()], connection=queue.get_connection(),
                               name="flag-test")

    worker._shutdown_requested_date = datetime.now(UTC)  # a double Ctrl-C
    worker.request_force_stop(signal.SIGTERM, None)
    assert not runner.force_stop.is_set()

    worker._shutdown_requested_date = datetime.now(UTC) - timedelta(seconds=5)
    with pytest.raises(SystemExit):
        worker.request_force_stop(signal.SIGTERM, None)
    assert runner.force_stop.is_set()
