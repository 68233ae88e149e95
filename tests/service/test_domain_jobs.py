"""Worker-facing job functions at the domain level: claim, progress, complete, fail, stale."""

from __future__ import annotations

import io
from datetime import timedelta

import numpy as np
import pytest
import torch
from safetensors.torch import load, save
from sqlalchemy import func, select, update

from models_store import LocalStore
from service import schemas
from service.auth import get_or_create_tenant
from service.domain import datasets, jobs, models, submission
from service.errors import JobStateError
from service.models import Artifact, Job, Model, utcnow
from tests.service.helpers import breast_cancer, logreg_spec, logreg_weights, npz_file


@pytest.fixture()
def store(tmp_path):
    return LocalStore(tmp_path / "store")


@pytest.fixture()
def queued(db_session, store):
    """A queued unlearning job of tenant alice on a registered model and dataset."""
    tenant = get_or_create_tenant(db_session, "alice")
    model = models.register_model(db_session, tenant, schemas.ModelCreate(**logreg_spec()),
                                  logreg_weights(), store)
    X, y = breast_cancer(50)
    dataset = datasets.register_dataset(db_session, tenant, "d.npz", npz_file(X=X, y=y), None,
                                        store)
    body = schemas.JobCreate(kind="unlearning", model_id=model.id, dataset_id=dataset.id,
                             params={"remove": [4, 2]})
    job, created = submission.submit_job(db_session, tenant, body, store, enqueue=lambda _id: None)
    assert created
    return job


def test_claim_is_exclusive_and_counts_attempts(db_session, queued):
    first = jobs.claim_job(db_session, queued.id, "w1")
    second = jobs.claim_job(db_session, queued.id, "w2")

    assert first is not None and first.status == "running" and first.worker == "w1"
    assert first.attempts == 1 and first.started_at is not None
    assert second is None


def test_progress_is_recorded_and_reports_cancel(db_session, queued):
    jobs.claim_job(db_session, queued.id, "w1")
    row = jobs.set_progress(db_session, queued.id, "solve", 3, 10)
    assert row.progress == {"phase": "solve", "done": 3, "total": 10}
    assert row.cancel_requested is False

    submission.cancel_job(db_session, queued.tenant_id, queued.id, cancel_in_queue=lambda _id: True)
    assert jobs.set_progress(db_session, queued.id, "solve", 4, 10).cancel_requested is True


def test_complete_job_writes_result_artifacts_and_child_model(db_session, queued, store):
    jobs.claim_job(db_session, queued.id, "w1")
    new_weights = {"0.weight": torch.full((1, 30), 0.5), "0.bias": torch.tensor([0.25])}
    scores = np.linspace(-1, 1, 50)

    done = jobs.complete_job(
        db_session, queued.id,
        values={"n_removed": 2, "parameter_change_norm": 0.125, "solver": {"iterations": 3}},
        arrays={"scores": scores, "tiny": np.array([1, 2])},
        timings={"solve": 0.5}, device="cpu", versions={"torch": torch.__version__},
        new_model={"weights": save(new_weights), "removed_indices": [4, 2]},
        store=store, inline_max=10,
    )

    assert done.status == "succeeded" and done.finished_at is not None
    result = done.result
    assert result["n_removed"] == 2 and result["tiny"] == [1, 2]
    assert result["scores"]["artifact"] == f"/v1/jobs/{queued.id}/artifacts/scores"
    artifact = db_session.scalar(select(Artifact).where(Artifact.job_id == queued.id))
    saved = np.load(io.BytesIO(store.get(artifact.sha256)), allow_pickle=False)
    np.testing.assert_array_equal(saved, scores)

    child = db_session.get(Model, result["model_id"])
    assert child.parent_id == queued.model_id and child.removed_indices == [4, 2]
    assert child.tenant_id == queued.tenant_id and child.n_parameters == 31
    assert torch.equal(load(store.get(child.sha256))["0.bias"], torch.tensor([0.25]))
    again = jobs.complete_job(db_session, queued.id, values={}, arrays={}, timings={},
                              device="cpu", versions={}, store=store)
    assert again.result == result


def test_complete_job_failure_leaves_nothing(db_session, queued, store):
    jobs.claim_job(db_session, queued.id, "w1")
    files_before = store.count()

    with pytest.raises(ValueError, match="object"):
        jobs.complete_job(
            db_session, queued.id, values={}, timings={}, device="cpu", versions={},
            arrays={"scores": np.arange(100.0), "bad": np.array([None, {}], dtype=object)},
            new_model={"0.weight": torch.zeros(1, 30), "0.bias": torch.zeros(1)},
            store=store, inline_max=10,
        )

    assert store.count() == files_before
    assert db_session.scalar(select(func.count()).select_from(Artifact)) == 0
    assert db_session.scalar(select(func.count()).select_from(Model)) == 1
    assert db_session.get(Job, queued.id).status == "running"


def test_fail_job_and_terminal_jobs_cannot_complete(db_session, queued, store):
    jobs.claim_job(db_session, queued.id, "w1")
    failed = jobs.fail_job(db_session, queued.id, "solver_diverged", "residual grew to 1e9")

    assert failed.status == "failed" and failed.error_code == "solver_diverged"
    public = submission.job_public(failed)
    assert public.error == schemas.JobError(code="solver_diverged", message="residual grew to 1e9")
    with pytest.raises(JobStateError):
        jobs.complete_job(db_session, queued.id, values={}, arrays={}, timings={},
                          device="cpu", versions={}, store=store)
    assert jobs.fail_job(db_session, queued.id, "other", "x").error_code == "solver_diverged"


def test_stale_jobs_are_requeued_then_failed(db_session, queued):
    jobs.claim_job(db_session, queued.id, "w1")
    assert jobs.find_stale_jobs(db_session, 60) == []

    old = utcnow() - timedelta(seconds=120)
    db_session.execute(update(Job).where(Job.id == queued.id).values(heartbeat_at=old))
    db_session.commit()
    stale = jobs.find_stale_jobs(db_session, 60)
    assert [j.id for j in stale] == [queued.id]

    assert jobs.requeue_or_fail(db_session, stale[0], max_attempts=2) is True
    row = db_session.get(Job, queued.id)
    assert row.status == "queued" and row.enqueue_failed is True
    assert [j.id for j in jobs.find_unenqueued_jobs(db_session)] == [queued.id]
    jobs.mark_enqueued(db_session, queued.id)
    assert jobs.find_unenqueued_jobs(db_session) == []

    second = jobs.claim_job(db_session, queued.id, "w2")
    assert second.attempts == 2
    assert jobs.requeue_or_fail(db_session, second, max_attempts=2) is False
    row = db_session.get(Job, queued.id)
    assert row.status == "failed" and row.error_code == "worker_lost"


def test_idempotency_race_returns_the_winner(db_session, queued, store, monkeypatch):
    # Both requests saw no key; the loser's commit hits the unique constraint.
    tenant = get_or_create_tenant(db_session, "alice")
    body = schemas.JobCreate(kind="unlearning", model_id=queued.model_id,
                             dataset_id=queued.dataset_id, params={"remove": [1]})
    winner, _ = submission.submit_job(db_session, tenant, body, store, idempotency_key="k",
                                      enqueue=lambda _id: None)
    real = submission._find_idempotent
    calls = []

    def blind_once(*args):
        calls.append(args)
        return None if len(calls) == 1 else real(*args)

    monkeypatch.setattr(submission, "_find_idempotent", blind_once)
    loser, created = submission.submit_job(db_session, tenant, body, store, idempotency_key="k",
                                           enqueue=lambda _id: None)

    assert (loser.id, created) == (winner.id, False)
    assert db_session.scalar(select(func.count()).select_from(Job)) == 2
