"""What the routes answer, as pydantic models: /openapi.json carries their JSON Schemas (idios/api/openapi.py);
the request bodies are idios/api/schemas.py."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class TowerEngine(BaseModel):
    engine: str = Field(description="openvino or onnxruntime")
    precision: str = Field(description="fp32, bf16 or int8")
    device: str = Field(description="CPU, or the onnxruntime execution provider")


class ModelEngines(BaseModel):
    visual: TowerEngine | None = Field(description="null where this process runs no visual tower (the distributed "
                                                   "API: its workers run them; their /health says on what)")
    text: TowerEngine | None = Field(description="null without a text tower, or with text search off")


class ModelIdentity(BaseModel):
    visual_sha256: str = Field(description="sha256 of the model's visual ONNX file, hashed at start-up")
    dim: int


SOURCE = ("where the weights came from, as the manifest's `source` says (say `{repo, revision, layout}`); null for "
          "a model exported or built locally")
IDENTITY = ("the model's files as found at start-up; its collection records the identity that filled it, and "
            "files that differ from it are refused")


class ModelInfo(BaseModel):
    name: str
    dim: int = Field(description="length of the embedding vectors")
    text: bool = Field(description="true when the model has a text tower: search by `text` works")
    engines: ModelEngines = Field(description="what runs each tower in this process (IDIOS_ENGINE, IDIOS_PRECISION)")
    source: Any = Field(description=SOURCE)
    identity: ModelIdentity | None = Field(description=IDENTITY)


class RefusedModel(BaseModel):
    """A model folder that is not served: its files differ from the weights its collection was filled with."""

    name: str
    dim: int = Field(description="length of the embedding vectors its files make")
    text: bool = Field(description="always false: a refused model answers no search")
    refused: str = Field(description="why, naming the stored and the found visual sha256; its routes answer 409 "
                                     "`model_refused`")
    source: Any = Field(description=SOURCE)
    identity: ModelIdentity | None = Field(description=IDENTITY)


class Hit(BaseModel):
    url: str
    metadata: dict[str, Any] | None
    similarity: float = Field(ge=0, le=100, description="100 × cosine, clamped at 0; 100 is identical")


class BulkFailure(BaseModel):
    url: str | None
    error: str
    type: str = Field(description="machine-readable cause, e.g. image_http_error, not_an_image, validation_error")


class BulkDuplicate(BaseModel):
    url: str = Field(description="the image refused (not added)")
    of: str = Field(description="the stored image it is a near copy of, or the earlier one of the same request")
    similarity: float = Field(ge=0, le=100, description="100 × cosine of the two")


class BulkResult(BaseModel):
    added: list[str]
    found: list[str] = Field(description="urls that were already stored (left unchanged)")
    failed: list[BulkFailure]
    duplicates: list[BulkDuplicate] = Field(
        description="with min_similarity, the images refused as near copies, in request order; always present")


class NearDuplicateBody(BaseModel):
    """search_add with min_similarity: a stored image at least that similar."""

    detail: str
    type: str = Field(description="`near_duplicate`")
    url: str = Field(description="the stored image, the most similar one")
    similarity: float = Field(ge=0, le=100, description="100 × cosine of the two")


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)  # an absent key, not an empty hash: the document says what the answer holds


class DumpRow(BaseModel):
    url: str
    embedding: list[float] | str = Field(
        description='numbers, or with encoding_format "base64" the little-endian float32 values as base64')
    metadata: dict[str, Any] | None
    phash: str = Field(default="", pattern="^[0-9a-f]{16}$", json_schema_extra=_no_default, description=(
        "the image's 64-bit perceptual hash (DCT pHash, as the imagehash library computes it) in 16 hex digits; "
        "absent when not known (collections made before it was stored, rows restored without one)"))


class Job(BaseModel):
    """A long job (GET /jobs/{job}): a duplicates job, as it goes."""

    job: str = Field(description="its id")
    kind: str = Field(description="`duplicates`")
    model: str
    state: Literal["running", "done", "failed", "cancelled"]
    done: int = Field(ge=0, description="rows examined so far")
    total: int = Field(ge=0, description="rows in the collection (passing `filter`) when the job started")
    groups: int = Field(ge=0, description="groups found; 0 until done")
    min_similarity: float = Field(ge=0, le=100, description="the threshold used (the model's default if none given)")
    filter: dict[str, Any] | None
    started: str = Field(description="ISO 8601, UTC")
    finished: str | None = Field(description="ISO 8601, UTC; null while running")
    error: str | None = Field(default=None, description="why a failed job failed")


class JobStarted(BaseModel):
    job: str = Field(description="the new job's id: GET /jobs/{job} follows it")


class DuplicateGroup(BaseModel):
    urls: list[str] = Field(description="the group's images, in url order")
    size: int = Field(ge=2)
    similarity: float = Field(ge=0, le=100, description="the lowest similarity of two images of the group")
    exact: bool | None = Field(default=None, description="every two images' perceptual hashes are within a few bits "
                               "(copies, resizes, re-encodings); absent for collections made before hashes were stored")


class GroupsPage(BaseModel):
    groups: list[DuplicateGroup] = Field(description="largest groups first, then the most alike")
    next: str | None = Field(description="the cursor of the next page; null on the last")


class ValidationItem(BaseModel):
    loc: list[str | int] = Field(description='where the problem is, e.g. ["body", "url"]')
    msg: str
    type: str = Field(description="machine-readable cause, e.g. value_error.url, image_too_small, missing")


class ValidationErrorBody(BaseModel):
    """FastAPI's 422 shape, as the original Idios answered."""

    detail: list[ValidationItem]


class ErrorBody(BaseModel):
    """Any other error. Some carry more fields (`models` on model_not_found, `request_id` on internal_error)."""

    model_config = ConfigDict(extra="allow")
    detail: str
    type: str | None = Field(default=None, description="machine-readable cause, e.g. model_not_found")
