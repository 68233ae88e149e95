"""Probes and the OpenAPI document."""

from __future__ import annotations

from tests.service.helpers import make_api


def test_healthz_and_readyz(api):
    assert api.client.get("/healthz").json() == {"status": "ok"}
    ready = api.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "redis": "ok"}


def test_readyz_names_what_is_down(database_url, tmp_path):
    api = make_api(database_url, tmp_path)
    api.client.app.state.redis_ping = lambda: False

    response = api.client.get("/readyz")

    assert response.status_code == 503
    assert response.json()["checks"] == {"database": "ok", "redis": "unreachable"}
    assert "redis" in response.json()["detail"]


def test_openapi_lists_the_contract(api):
    spec = api.client.get("/openapi.json").json()
    paths = spec["paths"]
    for path in ("/v1/models", "/v1/models/{model_id}/weights", "/v1/datasets",
                 "/v1/jobs", "/v1/jobs/{job_id}/result", "/v1/jobs/{job_id}/cancel",
                 "/v1/jobs/{job_id}/artifacts/{name}"):
        assert path in paths
    assert "multipart/form-data" in paths["/v1/models"]["post"]["requestBody"]["content"]
    assert api.client.get("/docs").status_code == 200


def test_readyz_reports_an_unreachable_database(tmp_path):
    import socket

    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: nothing listens there
    settings = Settings(data_dir=tmp_path,
                        database_url=f"postgresql+psycopg://nobody@127.0.0.1:{port}/none")
    client = TestClient(create_app(settings, redis_ping=lambda: True))

    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.json()["checks"] == {"database": "unreachable", "redis": "ok"}
    assert client.get("/healthz").status_code == 200
