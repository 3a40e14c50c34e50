"""API keys (read-only and read-write) and the Prometheus metrics."""

from __future__ import annotations

from pathlib import Path

from idios.settings import Settings
from tests.conftest import Service, running_service


async def call(svc: Service, method: str, path: str, key: str | None = None, header: str = "bearer",
               body: object = None) -> tuple[int, dict[str, str], object]:
    headers = {}
    if key is not None:
        headers = {"Authorization": f"Bearer {key}"} if header == "bearer" else {"X-API-Key": key}
    async with svc.http.request(method, svc.url + path, json=body, headers=headers) as resp:
        data = await resp.json() if resp.content_type == "application/json" else await resp.text()
        return resp.status, dict(resp.headers), data


async def test_api_keys(tmp_path: Path, models_dir: Path, images: str) -> None:
    keyfile = tmp_path / "keys"
    keyfile.write_text("# one key a line\nfile-key:ro\n")
    settings = Settings.from_env({}, data_dir=tmp_path, models_dir=models_dir, allow_private_urls=True,
                                 api_keys="rw-secret, ro-secret:ro", api_keys_file=keyfile)
    add = {"url": f"{images}/img/keyed.jpg"}
    async with running_service(settings) as svc:
        assert (await call(svc, "GET", "/ping"))[0] == 200  # public
        for key in (None, "wrong", "rw-secre", "rw-secret-"):
            status, headers, body = await call(svc, "POST", "/models/thumb_grid/add", key, body=add)
            assert status == 401 and body == {
                "detail": "A valid API key is required (Authorization: Bearer KEY or X-API-Key)",
                "type": "unauthorized"}, key  # the same answer whatever was wrong: no hint which keys exist
            assert headers["WWW-Authenticate"].startswith("Bearer")
        assert (await call(svc, "GET", "/models/thumb_grid/count"))[0] == 401
        assert (await call(svc, "POST", "/models/thumb_grid/add", "ro-secret", body=add))[0] == 403
        assert (await call(svc, "POST", "/models/thumb_grid/add", "file-key", "x-api-key", body=add))[0] == 403
        assert (await call(svc, "POST", "/models/thumb_grid/add", "rw-secret", body=add))[0] == 204
        assert (await call(svc, "POST", "/models/thumb_grid/remove", "ro-secret", body=add))[0] == 403
        for key in ("ro-secret", "file-key"):
            status, _, hits = await call(svc, "POST", "/models/thumb_grid/search", key, "x-api-key",
                                         body={**add, "indexed": True})
            assert status == 200 and hits[0]["url"] == add["url"]  # type: ignore[index]
            assert (await call(svc, "GET", "/models/thumb_grid/count", key))[2] == 1
            assert (await call(svc, "POST", "/models/thumb_grid/urls", key, body={}))[0] == 200
            assert (await call(svc, "POST", "/models/thumb_grid/dump", key, body={}))[0] == 200
            status, _, batch = await call(svc, "POST", "/models/thumb_grid/search_batch", key,
                                          body=[{**add, "indexed": True}])
            assert status == 200 and batch[0][0]["url"] == add["url"]  # type: ignore[index]
        meta = {"url": add["url"], "metadata": {"k": 1}}
        assert (await call(svc, "POST", "/models/thumb_grid/update_metadata", "ro-secret", body=meta))[0] == 403
        assert (await call(svc, "POST", "/models/thumb_grid/update_metadata", "rw-secret", body=meta))[0] == 204


async def test_no_keys_means_open_access(service: Service) -> None:
    assert (await call(service, "GET", "/models/thumb_grid/count"))[0] == 200


async def test_metrics(tmp_path: Path, models_dir: Path, images: str) -> None:
    settings = Settings.from_env({}, data_dir=tmp_path, models_dir=models_dir, allow_private_urls=True)
    async with running_service(settings) as svc:
        for i in range(3):
            assert (await call(svc, "POST", "/models/thumb_grid/add", body={"url": f"{images}/img/m{i}.jpg"}))[0] == 204
        assert (await call(svc, "POST", "/models/thumb_grid/add", body={"url": f"{images}/missing"}))[0] == 422
        status, headers, text = await call(svc, "GET", "/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        assert isinstance(text, str)
        lines = text.splitlines()

        def value(prefix: str) -> float:
            found = [float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix)]
            assert found, prefix
            return sum(found)

        assert value('idios_http_requests_total{method="POST",route="/models/{model}/add",status="204"}') == 3
        assert value('idios_http_requests_total{method="POST",route="/models/{model}/add",status="422"}') == 1
        assert value('idios_batch_size_count{model="thumb_grid",stage="embed"}') >= 1
        assert value('idios_batch_size_sum{model="thumb_grid",stage="embed"}') == 3
        assert value('idios_batch_seconds_count{model="thumb_grid",stage="write"}') >= 1
        assert value('idios_fetch_failures_total{type="image_http_error"}') == 1
        assert value('idios_jobs_total{kind="add",outcome="ok"}') == 3
        assert value("idios_jobs_in_flight") == 0
        assert value('idios_http_request_seconds_bucket{le="+Inf",route="/models/{model}/add"}') == 4


async def test_the_openapi_document_describes_the_keys(tmp_path: Path, models_dir: Path) -> None:
    """Swagger UI's Authorize button needs the schemes; clients need the 401/403 answers documented."""
    from openapi_spec_validator import validate

    settings = Settings.from_env({}, data_dir=tmp_path, models_dir=models_dir, api_keys="k1, k2:ro")
    async with running_service(settings) as svc:
        status, _, doc = await call(svc, "GET", "/openapi.json")
    assert status == 200 and isinstance(doc, dict)
    validate(doc)
    assert set(doc["components"]["securitySchemes"]) == {"bearerKey", "headerKey"}
    assert doc["security"] == [{"bearerKey": []}, {"headerKey": []}]
    paths = doc["paths"]
    assert paths["/ping"]["get"]["security"] == [] and paths["/docs"]["get"]["security"] == []
    assert {"401", "403"} <= set(paths["/models/{model}/add"]["post"]["responses"])
    search = paths["/models/{model}/search"]["post"]["responses"]
    assert "401" in search and "403" not in search  # a read-only key may search
    assert "403" not in paths["/models"]["get"]["responses"] and "401" in paths["/models"]["get"]["responses"]


async def test_without_keys_the_document_asks_for_none(service: Service) -> None:
    status, _, doc = await call(service, "GET", "/openapi.json")
    assert status == 200 and isinstance(doc, dict)
    assert "security" not in doc and "securitySchemes" not in doc["components"]
