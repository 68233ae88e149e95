"""Job submission, idempotency, cancel, pagination, results and artifacts over HTTP."""

from __future__ import annotations

import io

import numpy as np
import pytest

from service.db import session_scope
from service.domain import jobs as domain
from service.models import Job


@pytest.fixture()
def ids(api):
    return {"model_id": api.model_id(), "dataset_id": api.dataset_id()}


def unlearning(ids, remove=(0, 1)):
    return {"kind": "unlearning", **ids, "params": {"remove": list(remove)}}


def test_submit_answers_202_with_location_and_enqueues_after_commit(api, ids):
    response = api.submit(unlearning(ids))

    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["kind"] == "unlearning"
    assert job["params"]["remove"] == [0, 1] and job["params"]["method"] == "fisher"
    assert api.enqueued.calls == [job["id"]]
    fetched = api.client.get(f"/v1/jobs/{job['id']}", headers=api.h()).json()
    assert fetched["progress"] == {"phase": "queued", "done": 0, "total": 0}
    assert (fetched["attempts"], fetched["versions"]) == (0, None)


def test_idempotency_key_returns_the_same_job(api, ids):
    first = api.submit(unlearning(ids), **{"Idempotency-Key": "k1"})
    again = api.submit(unlearning(ids), **{"Idempotency-Key": "k1"})
    other = api.submit(unlearning(ids, remove=(5,)), **{"Idempotency-Key": "k1"})

    assert first.status_code == 202 and again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert api.enqueued.calls == [first.json()["id"]]
    assert other.status_code == 409
    assert other.json()["field"] == "Idempotency-Key"
    assert "different request body" in other.json()["detail"]


def test_enqueue_failure_leaves_a_flagged_queued_row(api, ids):
    api.enqueued.fail = True
    response = api.submit(unlearning(ids))

    assert response.status_code == 202
    with session_scope(api.url) as session:
        waiting = domain.find_unenqueued_jobs(session)
        assert [j.id for j in waiting] == [response.json()["id"]]
        assert waiting[0].status == "queued"


def test_cancel_queued_then_terminal_is_409(api, ids):
    job_id = api.submit(unlearning(ids)).json()["id"]

    cancelled = api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.h())
    again = api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.h())

    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert api.dropped.calls == [job_id]
    assert again.status_code == 409
    with session_scope(api.url) as session:
        assert domain.claim_job(session, job_id, "w1") is None


def test_cancel_running_only_requests_it(api, ids):
    job_id = api.submit(unlearning(ids)).json()["id"]
    with session_scope(api.url) as session:
        domain.claim_job(session, job_id, "w1")

    body = api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.h()).json()

    assert body["status"] == "running" and body["cancel_requested"] is True
    with session_scope(api.url) as session:
        assert domain.heartbeat(session, job_id).cancel_requested is True
        assert domain.mark_cancelled(session, job_id).status == "cancelled"


def test_pagination_and_filters(api, ids):
    made = [api.submit(unlearning(ids, remove=(i,))).json()["id"] for i in range(5)]
    api.client.post(f"/v1/jobs/{made[0]}/cancel", headers=api.h())

    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = api.client.get("/v1/jobs", params=params, headers=api.h()).json()
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == made[::-1]

    queued = api.client.get("/v1/jobs", params={"status": "queued"}, headers=api.h()).json()
    assert {j["id"] for j in queued["items"]} == set(made[1:])
    none = api.client.get("/v1/jobs", params={"kind": "cv"}, headers=api.h()).json()
    assert none["items"] == []
    bad = api.client.get("/v1/jobs", params={"limit": 0}, headers=api.h())
    assert bad.status_code == 422 and bad.json()["field"] == "limit"
    tampered = api.client.get("/v1/jobs", params={"cursor": "zzz"}, headers=api.h())
    assert tampered.status_code == 422 and tampered.json()["field"] == "cursor"


def test_result_is_409_until_succeeded_then_inline_and_artifacts(api, ids):
    job_id = api.submit(unlearning(ids)).json()["id"]
    assert api.client.get(f"/v1/jobs/{job_id}/result", headers=api.h()).status_code == 409

    big = np.arange(12_000, dtype=np.float64).reshape(3000, 4) / 7.0
    with session_scope(api.url) as session:
        domain.claim_job(session, job_id, "w1")
        domain.complete_job(
            session, job_id, values={"n_removed": 2, "parameter_change_norm": 0.5},
            arrays={"small": np.array([1.5, np.nan]), "big": big},
            timings={"solve": 0.25}, device="cpu", versions={"torch": "x"},
            store=api.client.app.state.store,
        )

    job = api.client.get(f"/v1/jobs/{job_id}", headers=api.h()).json()
    assert job["status"] == "succeeded" and job["timings"] == {"solve": 0.25}
    assert job["versions"] == {"torch": "x"} and job["attempts"] == 1
    result = api.client.get(f"/v1/jobs/{job_id}/result", headers=api.h()).json()
    assert result["small"] == [1.5, None]
    assert result["big"]["shape"] == [3000, 4] and result["big"]["dtype"] == "float64"
    download = api.client.get(result["big"]["artifact"], headers=api.h())
    assert download.status_code == 200
    np.testing.assert_array_equal(np.load(io.BytesIO(download.content), allow_pickle=False), big)
    assert api.client.get(result["big"]["artifact"], headers=api.h("bob")).status_code == 404


def test_jobs_are_invisible_to_other_tenants(api, ids):
    job_id = api.submit(unlearning(ids)).json()["id"]
    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/result"):
        assert api.client.get(path, headers=api.h("bob")).status_code == 404
    assert api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.h("bob")).status_code == 404
    # Bob cannot submit against Alice's model and dataset either.
    response = api.submit(unlearning(ids), tenant="bob")
    assert response.status_code == 404 and response.json()["field"] == "model_id"
    with session_scope(api.url) as session:
        assert session.get(Job, job_id).status == "queued"


@pytest.mark.parametrize("kind,params,stored", [
    ("cv", {"k": 3, "folds": 4}, {"k": 3, "folds": 4}),
    ("cv", {"folds": None}, {"k": 1, "folds": None}),  # leave-one-out
    ("cv", {"k": 7, "folds": None}, {"k": 7, "folds": None}),
    ("fairness", {"metric": "chi2", "unlearn": False}, {"metric": "chi2"}),
    ("fairness", {"metric": "demographic_parity"}, {"metric": "demographic_parity"}),
])
def test_other_kinds_are_accepted(api, kind, params, stored):
    X_ids = {"model_id": api.model_id()}
    from tests.service.helpers import breast_cancer, npz_file

    X, y = breast_cancer(60)
    dataset = api.post_dataset(npz_file(X=X, y=y, sensitive=(y + 1) % 2)).json()["id"]
    response = api.submit({"kind": kind, **X_ids, "dataset_id": dataset, "params": params})
    assert response.status_code == 202, response.text
    assert stored.items() <= response.json()["params"].items()


def test_attribution_checks_the_test_dataset(api, ids):
    test_id = api.dataset_id(n=30)
    body = {"kind": "attribution", **ids,
            "params": {"test_dataset_id": test_id, "test_indices": [0, 29], "top_k": 3}}
    assert api.submit(body).status_code == 202
