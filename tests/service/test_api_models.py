"""Model registration, listing, download round trip and tenant isolation over HTTP."""

from __future__ import annotations

import hashlib

import torch
from safetensors.torch import load

from tests.service.helpers import logreg_spec, logreg_weights


def test_register_model_answers_201_with_its_record(api):
    weights = logreg_weights(seed=3)
    response = api.post_model(weights=weights)

    assert response.status_code == 201, response.text
    body = response.json()
    assert body["name"] == "logreg"
    assert body["family"] == "bernoulli"
    assert body["n_parameters"] == 30 + 1
    assert body["sha256"] == hashlib.sha256(weights).hexdigest()
    assert body["parent_id"] is None
    assert body["created_at"]
    assert body["architecture"] == logreg_spec()["architecture"]


def test_spec_is_accepted_as_a_file_part(api):
    response = api.post_model(spec=logreg_spec(name="from-file"), spec_as_file=True)
    assert response.status_code == 201, response.text
    assert response.json()["name"] == "from-file"


def test_weights_download_round_trip(api):
    weights = logreg_weights(seed=7)
    model_id = api.model_id(weights=weights)

    response = api.client.get(f"/v1/models/{model_id}/weights", headers=api.h())

    assert response.status_code == 200
    assert response.content == weights
    original, downloaded = load(weights), load(response.content)
    assert set(downloaded) == {"0.weight", "0.bias"}
    assert torch.equal(downloaded["0.weight"], original["0.weight"])


def test_list_and_get(api):
    ids = [api.model_id(spec=logreg_spec(name=f"m{i}"), weights=logreg_weights(seed=i))
           for i in range(3)]

    listed = api.client.get("/v1/models", headers=api.h()).json()
    assert [m["id"] for m in listed["items"]] == ids[::-1]
    assert listed["next_cursor"] is None
    one = api.client.get(f"/v1/models/{ids[1]}", headers=api.h()).json()
    assert one["name"] == "m1"


def test_models_are_invisible_to_other_tenants(api):
    model_id = api.model_id()

    assert api.client.get(f"/v1/models/{model_id}", headers=api.h("bob")).status_code == 404
    response = api.client.get(f"/v1/models/{model_id}/weights", headers=api.h("bob"))
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/problem+json")
    assert api.client.get("/v1/models", headers=api.h("bob")).json()["items"] == []


def test_requests_without_a_valid_key_are_401(api):
    assert api.client.get("/v1/models").status_code == 401
    response = api.client.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401
    assert response.json()["title"] == "Unauthorized"


def test_regularizer_options_are_kept_with_the_model(api):
    elastic = {"kind": "elastic_net", "strength": 0.01, "l1_ratio": 0.25}
    grouped = {"kind": "group_lasso", "strength": 0.01, "groups": [["0.weight", "0.bias"]]}
    for seed, regularizer in enumerate((elastic, grouped)):
        spec = {**logreg_spec(name=regularizer["kind"]), "regularizer": regularizer}
        response = api.post_model(spec=spec, weights=logreg_weights(seed=seed))
        assert response.status_code == 201, response.text

        record = api.client.get(f"/v1/models/{response.json()['id']}", headers=api.h()).json()
        assert record["regularizer"] == {**regularizer, "exclude": []}
