"""/openapi.json documents exactly the routes the aiohttp app has, and its schemas are the ones routes validate."""

from __future__ import annotations

import re
from typing import Any

import pytest
from aiohttp import web

from idios.api import schemas
from idios.api.openapi import REF
from tests.conftest import Service

METHODS = {"get", "put", "post", "delete", "patch", "options"}


def registered(app: web.Application) -> set[tuple[str, str]]:
    """(method, path template) of every route; HEAD is left out, aiohttp adds it beside each GET."""
    found = set()
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        info = route.resource.get_info() if route.resource else {}
        if "prefix" in info:  # a static folder: one route serving every file below it
            path = info["prefix"] + "/{path}"
        else:
            path = info.get("formatter") or info["path"]
        found.add((route.method.lower(), re.sub(r"\{(\w+)(:[^}]*)?\}", r"{\1}", path)))
    return found


def documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method, path) for path, ops in doc["paths"].items() for method in ops if method in METHODS}


async def fetch_doc(service: Service) -> dict[str, Any]:
    async with service.http.get(service.url + "/openapi.json") as resp:
        assert resp.status == 200 and resp.content_type == "application/json"
        return await resp.json()


async def test_every_route_is_documented_and_nothing_else(service: Service) -> None:
    doc = await fetch_doc(service)
    routes, docs = registered(service.app), documented(doc)
    assert routes - docs == set(), "routes missing from openapi.json"
    assert docs - routes == set(), "openapi.json documents routes the app does not have"
    assert ("post", "/models/{model}/search") in docs and len(docs) >= 18


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [r for v in node.values() for r in refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


async def test_every_operation_is_complete(service: Service) -> None:
    doc = await fetch_doc(service)
    assert doc["openapi"].startswith("3.1")
    names = set(doc["components"]["schemas"])
    for target in refs(doc):
        assert target.startswith("#/components/schemas/") and target.rsplit("/", 1)[1] in names, target
    for path, ops in doc["paths"].items():
        in_path = set(re.findall(r"\{(\w+)\}", path))
        for method, op in ops.items():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == in_path, (method, path)
            assert op["summary"] and op["responses"], (method, path)
            if path.startswith("/models/"):
                assert "404" in op["responses"], f"{method} {path} does not document an unknown model"
            if "requestBody" in op:
                assert "422" in op["responses"], f"{method} {path} does not document validation errors"


async def test_the_document_is_valid_openapi_3_1(service: Service) -> None:
    from openapi_spec_validator import validate
    from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

    doc = await fetch_doc(service)
    validate(doc)
    broken = {**doc, "paths": {"/ping": {"get": {"parameters": [{"name": "rpc"}], "responses": {}}}}}
    with pytest.raises(OpenAPIValidationError):  # the validator does reject a broken document
        validate(broken)


async def test_request_schemas_are_the_validated_models(service: Service) -> None:
    doc = await fetch_doc(service)
    components = doc["components"]["schemas"]
    for model in (schemas.AddRequest, schemas.SearchRequest, schemas.CompareRequest, schemas.RestoreItem):
        generated = model.model_json_schema(ref_template=REF)
        generated.pop("$defs", None)
        assert components[model.__name__] == generated
    search = doc["paths"]["/models/{model}/search"]["post"]["requestBody"]["content"]
    assert search["application/json"]["schema"] == {"$ref": "#/components/schemas/SearchRequest"}
    assert search["multipart/form-data"]["schema"]["properties"]["image"]["format"] == "binary"
    assert components["AddRequest"]["required"] == ["url"]
    assert components["AddRequest"]["additionalProperties"] is False


async def test_request_examples_are_valid_bodies(service: Service) -> None:
    """Every request example validates against its documented schema (components resolved), and the examples of
    search, search_batch and update_metadata are also accepted by the pydantic models the routes parse with."""
    from jsonschema import Draft202012Validator

    doc = await fetch_doc(service)
    seen: dict[str, list[Any]] = {}
    for path, ops in doc["paths"].items():
        for method, operation in ops.items():
            content = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
            for name, example in content.get("examples", {}).items():
                validator = Draft202012Validator({**content["schema"], "components": doc["components"]})
                errors = [e.message for e in validator.iter_errors(example["value"])]
                assert not errors, (method, path, name, errors)
                seen.setdefault(path, []).append(example["value"])
    search, batch, edit = (seen.get(f"/models/{{model}}/{name}", [])
                           for name in ("search", "search_batch", "update_metadata"))
    assert len(search) >= 5 and batch and len(edit) >= 3, sorted(seen)
    for value in search:
        schemas.parse(schemas.SearchRequest, value)
    for value in batch:
        assert [schemas.parse(schemas.SearchRequest, v) for v in value]
    for value in edit:
        for item in value if isinstance(value, list) else [value]:
            schemas.parse(schemas.MetadataEditRequest, item)
    bad = {"url": "http://127.0.0.1/a.jpg", "offset": -1}
    assert list(Draft202012Validator({"$ref": REF.format(model="SearchRequest"),
                                      "components": doc["components"]}).iter_errors(bad)), "the check can fail"


async def test_docs_and_page_are_served_without_remote_assets(service: Service) -> None:
    for path in ("/", "/docs"):
        async with service.http.get(service.url + path) as resp:
            assert resp.status == 200 and resp.content_type == "text/html"
            html = await resp.text()
            assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", html), f"{path} loads something remote"
    async with service.http.get(service.url + "/static/swagger-ui/LICENSE") as resp:
        assert resp.status == 200 and "Apache License" in await resp.text()
