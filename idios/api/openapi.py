"""The OpenAPI 3.1 description served at /openapi.json.

Request bodies come from the pydantic models in `schemas.py` and answers from those in `answers.py` (their JSON
Schemas), so the document cannot drift from what the routes validate; only the prose and the list of operations
are written here.
tests/test_openapi.py checks that every route the app registers is documented and nothing else is.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from idios import __version__
from idios.api.answers import (
    BulkDuplicate,
    BulkFailure,
    BulkResult,
    DumpRow,
    DuplicateGroup,
    ErrorBody,
    GroupsPage,
    Hit,
    Job,
    JobStarted,
    ModelEngines,
    ModelIdentity,
    ModelInfo,
    NearDuplicateBody,
    RefusedModel,
    TowerEngine,
    ValidationErrorBody,
    ValidationItem,
)
from idios.api.schemas import (
    AddRequest,
    BulkParams,
    CompareRequest,
    DumpRequest,
    DuplicatesRequest,
    GroupsRequest,
    MetadataEditRequest,
    PageRequest,
    RemoveRequest,
    RestoreItem,
    SearchAddRequest,
    SearchRequest,
)
from idios.settings import Settings

REF = "#/components/schemas/{model}"
DUMP_ROWS = "url, embedding, metadata and phash (when known), strictly after `cursor`."


REQUESTS: list[type[BaseModel]] = [
    AddRequest, SearchAddRequest, SearchRequest, CompareRequest, RemoveRequest, PageRequest, DumpRequest, RestoreItem,
    DuplicatesRequest, MetadataEditRequest,
]
RESPONSES: list[type[BaseModel]] = [
    ModelInfo, RefusedModel, Hit, BulkResult, NearDuplicateBody, DumpRow, ValidationErrorBody, ErrorBody,
    Job, JobStarted, DuplicateGroup, GroupsPage,
]


def ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def component_schemas() -> dict[str, Any]:
    """JSON Schemas of the request models (as validated) and the response models (as serialised)."""
    pairs = [(m, "validation") for m in REQUESTS] + [(m, "serialization") for m in RESPONSES]
    _, top = models_json_schema(pairs, ref_template=REF)  # type: ignore[arg-type]
    return dict(top.get("$defs", {}))


def json_answer(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def error(model: type[BaseModel], description: str) -> dict[str, Any]:
    return json_answer(ref(model), description)


NO_CONTENT = {"204": {"description": "Done; no body"}}
# answered by aiohttp's HTTP parser before any route runs, so in plain text
MALFORMED = {"400": {"description": "A malformed HTTP request: in plain text from the HTTP parser (say a request "
                                    "line over 32 KiB), or `form_invalid` for a multipart body that cannot be read",
                     "content": {"text/plain": {"schema": {"type": "string"}},
                                 "application/json": {"schema": ref(ErrorBody)}}}}
MODEL_ERRORS = {
    "404": error(ErrorBody, "No such model (`model_not_found`, with `models`: the loaded ones)"),
    "409": error(ErrorBody, "`model_refused`: the model's files differ from the weights its collection was filled "
                            "with, so it is not served (GET /models says why)"),
    "500": error(ErrorBody, "`internal_error` or `worker_error`: a message and a request id, never a traceback"),
}
BODY_ERRORS = {
    **MODEL_ERRORS,
    "413": error(ErrorBody, "`payload_too_large`: the request body is over the limit"),
    "415": error(ErrorBody, "`unsupported_media_type`: this route takes a JSON body, not a form"),
    "422": error(ValidationErrorBody, "The body failed validation, or the image cannot be used "
                 "(`image_http_error`, `image_unreachable`, `image_timeout`, `image_too_many_redirects`, "
                 "`private_address`, `host_not_allowed`, `image_too_large`, `not_an_image`, `image_too_small`)"),
}
JOB_ERRORS = {**BODY_ERRORS, "504": error(ErrorBody, "`job_timeout`: the image work did not finish in time")}

MODEL_PARAM = {
    "name": "model", "in": "path", "required": True, "schema": {"type": "string"},
    "description": "name of a loaded model (GET /models lists them)",
}


def json_schema_of(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema(ref_template=REF)


def multipart(model: type[BaseModel], files: dict[str, str], json_fields: tuple[str, ...] = ()) -> dict[str, Any]:
    """A form version of `model`: its fields as form fields (JSON-valued ones as JSON text) plus image files."""
    schema = json_schema_of(model)
    props: dict[str, Any] = {}
    for name, prop in schema.get("properties", {}).items():
        props[name] = {"type": "string", "description": f"{name} as JSON text"} if name in json_fields else prop
    for name, text in files.items():
        props[name] = {"type": "string", "format": "binary", "description": text}
    return {"type": "object", "properties": props, "required": list(schema.get("required", []))}


def body(model: type[BaseModel] | dict[str, Any], form: dict[str, Any] | None = None,
         examples: dict[str, tuple[str, Any]] | None = None) -> dict[str, Any]:
    """A request body: JSON of `model`, or also a multipart form; `examples`: name -> (summary, JSON value)."""
    schema = ref(model) if isinstance(model, type) else model
    content: dict[str, Any] = {"application/json": {"schema": schema}}
    if examples:
        content["application/json"]["examples"] = {
            name: {"summary": summary, "value": value} for name, (summary, value) in examples.items()}
    if form is not None:
        content["multipart/form-data"] = {"schema": form}
    return {"required": True, "content": content}


def query_params(model: type[BaseModel]) -> list[dict[str, Any]]:
    """Query parameters from a request model's fields (GET forms of the paging routes)."""
    schema = json_schema_of(model)
    return [
        {"name": name, "in": "query", "required": name in schema.get("required", []), "schema": prop}
        for name, prop in schema["properties"].items()
    ]


def op(summary: str, description: str, responses: dict[str, Any], *, tag: str = "images",
       request: dict[str, Any] | None = None, params: list[dict[str, Any]] | None = None,
       model: bool = True) -> dict[str, Any]:
    operation: dict[str, Any] = {"tags": [tag], "summary": summary, "description": description}
    parameters = ([MODEL_PARAM] if model else []) + (params or [])
    if parameters:
        operation["parameters"] = parameters
    if request is not None:
        operation["requestBody"] = request
    operation["responses"] = {**responses, **MALFORMED}
    return operation


ADD_FORM = multipart(AddRequest, {"image": "the image itself; `url` is then only its id"}, ("metadata",))
SEARCH_ADD_FORM = multipart(SearchAddRequest, {"image": "the image itself; `url` is then only its id"}, ("metadata",))
SEARCH_FORM = multipart(SearchRequest, {"image": "the query image (or the `{\"image\": true}` part of `queries`)"},
                        ("filter", "queries"))
COMPARE_FORM = multipart(CompareRequest, {"image": "first image (instead of `url`)",
                                          "other_image": "second image (instead of `other`)"})
TEXT = {"text/html": {"schema": {"type": "string"}}}
# Request examples: loopback urls only, because tests/test_fuzz.py sends every example to the service.
A, B = "http://127.0.0.1/a.jpg", "http://127.0.0.1/b.jpg"
SEARCH_EXAMPLES: dict[str, tuple[str, Any]] = {
    "url": ("By image url", {"url": A, "limit": 10}),
    "page": ("The second page of 20 (pages concatenate to the unpaged answer)", {"url": A, "limit": 20, "offset": 20}),
    "filter": ("Text, filtered with operators", {"text": "a harbour at night", "filter": {
        "year": {"gte": 1900, "lt": 1950}, "or": [{"tags": {"contains": "map"}}, {"lang": {"in": ["nl", "fr"]}}]}}),
    "weighted": ("Weighted parts: like A, in winter, less like B", {"queries": [
        {"indexed": A}, {"text": "in winter", "weight": 0.5}, {"indexed": B, "weight": -0.5}]}),
    "grouped": ("The best 2 hits of each of the 10 best manifests",
                {"indexed": True, "url": A, "group_by": "iiif_manifest", "group_size": 2, "limit": 10}),
}
BATCH_EXAMPLES: dict[str, tuple[str, Any]] = {"mixed": ("Three searches answered in order", [
    {"url": A, "indexed": True, "limit": 5}, {"url": B, "indexed": True, "limit": 5, "filter": {"lang": "nl"}},
    {"queries": [{"indexed": A}, {"indexed": B, "weight": -0.5}], "limit": 5}])}
EDIT_EXAMPLES: dict[str, tuple[str, Any]] = {
    "replace": ("Replace one image's metadata", {"url": A, "metadata": {"title": "Harbour", "year": 1911}}),
    "merge": ("Merge: set year, remove draft, keep the rest", {"url": A, "metadata": {"year": 1912, "draft": None},
                                                               "merge": True}),
    "list": ("Several edits in one request", [{"url": A, "metadata": {"year": 1912}, "merge": True},
                                              {"url": B, "metadata": None}]),
}
NEAR_LIMIT = "requests sent at the same time are compared with the stored images only, not with each other"


def image_paths(settings: Settings) -> dict[str, dict[str, Any]]:
    """The model routes: adding, searching, comparing, paging, removing."""
    bulk = settings.max_bulk_items
    paging = {"200": json_answer({"type": "array", "items": {"type": "string"}}, "urls in order")}
    return {
        "/models/{model}/add": {"post": op(
            "Add or replace an image", "Upsert by url: fetch the image (or take the uploaded one), embed, store.",
            {**NO_CONTENT, **JOB_ERRORS}, request=body(AddRequest, ADD_FORM))},
        "/models/{model}/search_add": {"post": op(
            "Add an image unless its url is stored",
            "As add, but a stored url answers 409 and is left unchanged; with `min_similarity`, so does an image at "
            "least that similar to a stored one (" + NEAR_LIMIT + ").",
            {**NO_CONTENT, **JOB_ERRORS,
             "409": json_answer({"anyOf": [ref(NearDuplicateBody), ref(ErrorBody)]},
                                "`already_inserted`: detail \"Image already inserted\" (checked first); "
                                "`near_duplicate`, with the stored `url` and its `similarity`; or `model_refused`")},
            request=body(SearchAddRequest, SEARCH_ADD_FORM))},
        "/models/{model}/add_bulk": {"post": op(
            "Add many images",
            f"At most {bulk} items; each one succeeds or fails on its own. With `?min_similarity=`, an image at least "
            "that similar to a stored one, or to an earlier image of the same request that is added, is not added "
            "but listed in `duplicates` (" + NEAR_LIMIT + ").",
            {"200": json_answer(ref(BulkResult), "what happened to each url"), **JOB_ERRORS},
            params=query_params(BulkParams),
            request=body({"type": "array", "maxItems": bulk, "items": ref(AddRequest)}))},
        "/models/{model}/restore": {"post": op(
            "Store rows with their embeddings",
            f"As dumped (numbers or base64 embeddings, mixed as one likes; `phash` kept where the collection stores "
            f"it); no image is fetched. At most {bulk} rows.",
            {**NO_CONTENT, **JOB_ERRORS}, request=body({"type": "array", "maxItems": bulk, "items": ref(RestoreItem)}),
            tag="rows")},
        "/models/{model}/search": {"post": op(
            "Find the most similar stored images",
            "By image url, uploaded image, text (models with a text tower) or a stored url (`indexed`). "
            "Best first. Without url, text or image: 422 `{\"detail\": \"Either 'text' or 'url' must be provided.\"}`",
            {"200": json_answer({"type": "array", "items": ref(Hit)}, "hits, best first"),
             **JOB_ERRORS, "404": error(ErrorBody, "No such model, or an `indexed` url that is not stored"),
             "422": json_answer({"anyOf": [ref(ValidationErrorBody), ref(ErrorBody)]},
                                BODY_ERRORS["422"]["description"] + "; with neither url, text nor image, the "
                                "original service's `{\"detail\": \"Either 'text' or 'url' must be provided.\"}`")},
            request=body(SearchRequest, SEARCH_FORM, SEARCH_EXAMPLES))},
        "/models/{model}/search_batch": {"post": op(
            "Several searches in one request",
            "At most 100 search bodies (JSON: url, text, indexed or queries; no uploads) answered in order, a list "
            "of hits for each. Stored vectors are read in one query and the bodies that share a filter and a page "
            "are searched in one Milvus call. One bad body fails the batch: the 422's `loc` starts with its index.",
            {"200": json_answer({"type": "array", "items": {"type": "array", "items": ref(Hit)}},
                                "one list of hits per body, in order"),
             **JOB_ERRORS, "404": error(ErrorBody, "No such model, or an `indexed` url that is not stored (its "
                                                   "body's `index`)")},
            request=body({"type": "array", "minItems": 1, "maxItems": 100, "items": ref(SearchRequest)},
                         examples=BATCH_EXAMPLES))},
        "/models/{model}/compare": {"post": op(
            "Similarity of two images", "Each side is a url or an uploaded image.",
            {"200": json_answer({"type": "number", "minimum": 0, "maximum": 100}, "similarity, 100 = identical"),
             **JOB_ERRORS}, request=body(CompareRequest, COMPARE_FORM))},
        "/models/{model}/urls": {
            "get": op("Page through stored urls", "Strictly after `cursor`, in order.", {**paging, **MODEL_ERRORS,
                      "422": BODY_ERRORS["422"]}, params=query_params(PageRequest), tag="rows"),
            "post": op("Page through stored urls", "Strictly after `cursor`, in order.", {**paging, **BODY_ERRORS},
                       request=body(PageRequest), tag="rows"),
        },
        "/models/{model}/dump": {
            "get": op("Page through stored rows", DUMP_ROWS,
                      {"200": json_answer({"type": "array", "items": ref(DumpRow)}, "rows in url order"),
                       **MODEL_ERRORS, "422": BODY_ERRORS["422"]}, params=query_params(DumpRequest), tag="rows"),
            "post": op("Page through stored rows", DUMP_ROWS,
                       {"200": json_answer({"type": "array", "items": ref(DumpRow)}, "rows in url order"),
                        **BODY_ERRORS}, request=body(DumpRequest), tag="rows"),
        },
        "/models/{model}/count": {"get": op(
            "Number of stored images", "Milvus's count, not an enumeration.",
            {"200": json_answer({"type": "integer", "minimum": 0}, "the count"), **MODEL_ERRORS}, tag="rows")},
        "/models/{model}/update_metadata": {"post": op(
            "Change the metadata of stored images",
            f"One edit or a list of at most {bulk}; the vectors stay, no image is fetched. `merge: true` applies "
            "`metadata` as a JSON Merge Patch (RFC 7396: null removes a key, objects merge key by key); else it "
            "replaces the stored metadata. Edits of one url apply in order; the edit is ordered with the other "
            "writes of its url as adds are. An url not stored fails the whole request: nothing is changed.",
            {**NO_CONTENT, **BODY_ERRORS,
             "404": error(ErrorBody, "`not_found`: urls not stored, listed in `missing`; nothing was changed (or "
                                     "no such model)")},
            request=body({"anyOf": [ref(MetadataEditRequest),
                                    {"type": "array", "minItems": 1, "maxItems": bulk,
                                     "items": ref(MetadataEditRequest)}]}, examples=EDIT_EXAMPLES), tag="rows")},
        "/models/{model}/remove": {"post": op(
            "Remove an image", "Removing a url that is not stored is not an error.",
            {**NO_CONTENT, **BODY_ERRORS}, request=body(RemoveRequest), tag="rows")},
    }


def job_paths() -> dict[str, dict[str, Any]]:
    """Duplicates jobs: start one, follow it, page through its groups, cancel it (idios/jobs.py, idios/dedup.py)."""
    job_param = {"name": "job", "in": "path", "required": True, "schema": {"type": "string"}, "description": "a job id"}
    unknown = {"404": error(ErrorBody, "`job_not_found`: no such job")}
    record = {"200": json_answer(ref(Job), "the job")}
    return {
        "/models/{model}/duplicates": {"post": op(
            "Find the duplicates across a collection",
            "Starts a job that groups the stored images at least `min_similarity` alike (default: the threshold "
            "measured for the model), among the rows passing `filter`; exact copies are told by their perceptual "
            "hashes. One runs per model at a time. It runs in an API process, survives a restart (it resumes from "
            "its checkpoint) and is read from any API process.",
            {"202": json_answer(ref(JobStarted), "started"), **BODY_ERRORS,
             "409": error(ErrorBody, "`job_running`: a duplicates job runs for this model (`job` names it); or "
                                     "`model_refused`")},
            request={"required": False, "content": {"application/json": {"schema": ref(DuplicatesRequest)}}},
            tag="jobs")},
        "/jobs": {"get": op(
            "The jobs", "Newest first, at most 50 (the 20 newest finished jobs of each model are kept).",
            {"200": json_answer({"type": "array", "items": ref(Job)}, "jobs")},
            params=[{"name": "model", "in": "query", "required": False, "schema": {"type": "string"},
                     "description": "only this model's jobs"}], model=False, tag="jobs")},
        "/jobs/{job}": {
            "get": op("A job", "State and progress.", {**record, **unknown}, params=[job_param], model=False,
                      tag="jobs"),
            "delete": op("Cancel a job", "It stops at its next checkpoint (within a page of rows); answered with "
                         "its record as cancelled.",
                         {**record, **unknown, "409": error(ErrorBody, "`job_finished`: the job is not running")},
                         params=[job_param], model=False, tag="jobs"),
        },
        "/jobs/{job}/groups": {"get": op(
            "A done duplicates job's groups", "Largest first; follow `next` as `cursor`.",
            {"200": json_answer(ref(GroupsPage), "a page of groups"), **unknown,
             "409": error(ErrorBody, "`job_not_done`: the job is running, failed or was cancelled"),
             "422": BODY_ERRORS["422"]},
            params=[job_param, *query_params(GroupsRequest)], model=False, tag="jobs")},
    }


def service_paths() -> dict[str, dict[str, Any]]:
    """Health, the model list, and the pages for people."""
    rpc = {"name": "rpc", "in": "query", "required": False, "schema": {"type": "string"},
           "description": "anything but empty, 0 or false (say 1): answer only after a round trip through the job "
                          "bus and a worker"}
    page = {"200": {"description": "an HTML page", "content": TEXT}}
    return {
        "/ping": {"get": op("Health check", "Answers \"pong\".",
                            {"200": json_answer({"const": "pong"}, "alive"),
                             "500": MODEL_ERRORS["500"], "504": JOB_ERRORS["504"]},
                            params=[rpc], model=False, tag="service")},
        "/models": {"get": op("The loaded models", "Name, embedding size, whether text search works, what runs "
                              "each tower, and the weights' source and identity; then the refused models, if any.",
                              {"200": json_answer({"type": "array",
                                                   "items": {"anyOf": [ref(ModelInfo), ref(RefusedModel)]}},
                                                  "models")},
                              model=False, tag="service")},
        "/metrics": {"get": op("Prometheus metrics", "Requests, latencies, jobs, batch sizes and times, fetch "
                               "failures by type, queue depth (distributed deployment).",
                               {"200": {"description": "Prometheus text format",
                                        "content": {"text/plain": {"schema": {"type": "string"}}}}},
                               model=False, tag="service")},
        "/": {"get": op("The built-in search page", "Search, add and compare from a browser.", page,
                        model=False, tag="pages")},
        "/docs": {"get": op("This documentation, rendered", "Swagger UI, served locally.", page,
                            model=False, tag="pages")},
        "/openapi.json": {"get": op("This document", "OpenAPI 3.1.",
                                    {"200": json_answer({"type": "object"}, "the OpenAPI document")},
                                    model=False, tag="pages")},
        "/static/{path}": {"get": op(
            "Files of the built-in pages", "Scripts, styles and the vendored Swagger UI.",
            {"200": {"description": "the file"}, "404": error(ErrorBody, "no such file")},
            params=[{"name": "path", "in": "path", "required": True, "schema": {"type": "string"}}],
            model=False, tag="pages")},
    }


SECURITY_SCHEMES = {
    "bearerKey": {"type": "http", "scheme": "bearer", "description": "an API key as `Authorization: Bearer KEY`"},
    "headerKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "an API key"},
}


def secure(document: dict[str, Any]) -> None:
    """With API keys configured: the key schemes, a key required everywhere but the public paths, and the 401
    (and, where a read-only key is not enough, 403) answers, as idios.api.auth enforces them."""
    from idios.api.auth import PUBLIC_PATHS, PUBLIC_PREFIXES, READ_ACTIONS

    document["components"]["securitySchemes"] = SECURITY_SCHEMES
    document["security"] = [{"bearerKey": []}, {"headerKey": []}]
    unauthorized = error(ErrorBody, "`unauthorized`: no valid API key (the same answer whatever was wrong)")
    forbidden = error(ErrorBody, "`forbidden`: this API key is read-only")
    for path, ops in document["paths"].items():
        public = path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)
        for method, operation in ops.items():
            if public:
                operation["security"] = []
                continue
            operation["responses"]["401"] = unauthorized
            if method != "get" and path.rsplit("/", 1)[-1] not in READ_ACTIONS:
                operation["responses"]["403"] = forbidden


def name_models(document: dict[str, Any], models: list[str]) -> None:
    """The `model` path parameter as the list of the models this service loads (a 404 answers any other)."""
    param = {**MODEL_PARAM, "schema": {"type": "string", "enum": models}}
    for ops in document["paths"].values():
        for operation in ops.values():
            if "parameters" in operation:
                operation["parameters"] = [param if p is MODEL_PARAM else p for p in operation["parameters"]]


def build(settings: Settings, models: list[str] | None = None) -> dict[str, Any]:
    """The whole OpenAPI document; with `models`, the model path parameter lists them."""
    from idios.api.auth import ApiKeys

    document = {
        "openapi": "3.1.0",
        "info": {
            "title": "Idios",
            "version": __version__,
            "description": "Reverse image search over many models. The url is an image's id. "
                           "Errors are JSON with a machine-readable `type`.",
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "tags": [
            {"name": "images", "description": "add, search and compare images"},
            {"name": "rows", "description": "list, count, dump, restore and remove stored rows"},
            {"name": "jobs", "description": "long jobs over a whole collection: duplicates"},
            {"name": "service", "description": "health and models"},
            {"name": "pages", "description": "for people with a browser"},
        ],
        "paths": {**service_paths(), **image_paths(settings), **job_paths()},
        "components": {"schemas": component_schemas()},
    }
    if models:
        name_models(document, models)
    if ApiKeys.from_settings(settings) is not None:
        secure(document)
    return document
