"""Server errors reach the caller as typed exceptions carrying the problem details."""

from __future__ import annotations

import numpy as np
import pytest
from client_fixtures import LogReg, Registered

from client import Client, Conflict, InvalidInput, JobFailed, NotFound, Unauthorized
from client.stack import LocalStack


def test_unknown_model_is_404(client: Client) -> None:
    with pytest.raises(NotFound) as info:
        client.get_model("no-such-model")
    assert info.value.status == 404
    assert info.value.title


def test_wrong_key_is_401(stack: LocalStack) -> None:
    with Client(stack.url, "not-a-key") as bad, pytest.raises(Unauthorized) as info:
        bad.list_models()
    assert info.value.status == 401


def test_other_tenant_sees_404(stack: LocalStack, registered: Registered) -> None:
    with stack.client(stack.create_key("someone-else")) as other:
        with pytest.raises(NotFound):
            other.get_model(registered.model.id)
        assert registered.model.id not in {m.id for m in other.list_models()}


def test_labels_that_do_not_fit_the_family_are_refused(
    client: Client, registered: Registered, logreg: LogReg
) -> None:
    bad = client.register_dataset(logreg.X, np.full(len(logreg.y), 2), name="bad-labels")
    with pytest.raises(InvalidInput) as info:
        client.submit("cv", model=registered.model, dataset=bad)
    assert info.value.status == 422
    assert "bernoulli" in str(info.value.detail) or "0/1" in str(info.value.detail)


def test_out_of_range_row_names_the_field(client: Client, registered: Registered) -> None:
    with pytest.raises(InvalidInput) as info:
        client.submit("unlearning", model=registered.model, dataset=registered.train,
                      remove=[10_000])
    assert info.value.field == "params.remove"


def test_failed_job_raises_with_the_server_message(
    client: Client, registered: Registered, failing_params: dict[str, object]
) -> None:
    job = client.submit("unlearning", model=registered.model, dataset=registered.train,
                        **failing_params)
    with pytest.raises(JobFailed) as info:
        job.wait(timeout=120)
    assert job.status == "failed"
    assert info.value.code == job.error.code
    assert info.value.message == job.error.message and info.value.message

    # A failed job has no result: 409 with the job's status named.
    with pytest.raises(Conflict) as conflict:
        job.raw_result()
    assert conflict.value.status == 409
    assert "failed" in str(conflict.value.detail)
