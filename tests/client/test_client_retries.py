"""Transient failures are retried; a replayed submit never makes a second job.

The server is real; a transport wrapper injects the fault in front of it."""

from __future__ import annotations

import httpx
import pytest
from client_fixtures import Registered

from client import Client, ServiceUnavailable
from client.stack import LocalStack


class Faulty(httpx.BaseTransport):
    """Forwards to the real server, injecting one listed fault per request until empty.

    "connect": fail before sending; "503": answer 503 without sending; "lost": send,
    let the server act, then drop its answer.
    """

    def __init__(self, faults: list[str]) -> None:
        self.inner = httpx.HTTPTransport()
        self.faults = list(faults)
        self.sent: list[tuple[str, str, str | None]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        fault = self.faults.pop(0) if self.faults else None
        if fault == "connect":
            raise httpx.ConnectError("injected: connection refused", request=request)
        if fault == "503":
            return httpx.Response(503, headers={"Retry-After": "0"},
                                  json={"title": "Service Unavailable", "status": 503,
                                        "detail": "injected"})
        self.sent.append((request.method, request.url.path,
                          request.headers.get("Idempotency-Key")))
        response = self.inner.handle_request(request)
        if fault == "lost":
            response.read()
            response.close()
            raise httpx.ReadError("injected: answer lost", request=request)
        return response


def _client(stack: LocalStack, faults: list[str]) -> tuple[Client, Faulty]:
    transport = Faulty(faults)
    return Client(stack.url, stack.key, transport=transport, backoff=0.01), transport


def test_connection_errors_and_503_are_retried(stack: LocalStack, registered: Registered
                                               ) -> None:
    c, transport = _client(stack, ["connect", "503", "connect"])
    with c:
        assert c.get_model(registered.model.id).id == registered.model.id
    assert transport.faults == [] and len(transport.sent) == 1


def test_retries_give_up_with_a_typed_error(stack: LocalStack) -> None:
    c, _ = _client(stack, ["connect"] * 10)
    c.retries = 2
    with c, pytest.raises(ServiceUnavailable):
        c.list_models()


def test_lost_answer_to_submit_makes_one_job(stack: LocalStack, registered: Registered
                                             ) -> None:
    c, transport = _client(stack, [])
    with c:
        before = {j.id for j in c.list_jobs(kind="cv")}
        transport.faults = ["lost"]
        job = c.submit("cv", model=registered.model, dataset=registered.train, folds=3,
                       seed=7)
        after = {j.id for j in c.list_jobs(kind="cv")}
        job.wait(timeout=120)

    posts = [s for s in transport.sent if s[0] == "POST"]
    assert len(posts) == 2, "the POST reached the server twice"
    assert posts[0][2] and posts[0][2] == posts[1][2], "both carried the same Idempotency-Key"
    assert after - before == {job.id}, "yet only one job exists"


def test_same_idempotency_key_returns_the_same_job(client: Client, registered: Registered
                                                   ) -> None:
    first = client.submit("cv", model=registered.model, dataset=registered.train, folds=2,
                          idempotency_key="client-test-key-1")
    again = client.submit("cv", model=registered.model, dataset=registered.train, folds=2,
                          idempotency_key="client-test-key-1")
    assert again.id == first.id
    first.wait(timeout=120)


def test_lost_answer_without_idempotency_key_is_not_replayed(stack: LocalStack
                                                             ) -> None:
    c, transport = _client(stack, ["lost"])
    with c, pytest.raises(ServiceUnavailable):
        c.request("POST", f"/v1/jobs/{'x' * 8}/cancel")
    assert len(transport.sent) == 1
