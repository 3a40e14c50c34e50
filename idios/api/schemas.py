"""Request bodies, validated with pydantic so that 422s have FastAPI's shape, as the original service's did."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, ValidationError, WithJsonSchema,
                      model_validator)
from pydantic_core import PydanticCustomError
from yarl import URL

from idios import errors, iiif
from idios.limits import METADATA_MAX, PAGE_MAX, URL_MAX, metadata_bytes
from idios.phash import valid as valid_phash


_CONTROL = re.compile(r"[\x00-\x20\x7f]")


def check_url(value: str) -> str:
    if len(value) > URL_MAX:
        raise PydanticCustomError("value_error.url", f"URL is longer than {URL_MAX} characters")
    if _CONTROL.search(value):
        raise PydanticCustomError("value_error.url", "URL must not contain spaces or control characters")
    try:
        parsed = URL(value)
    except (ValueError, TypeError):
        raise PydanticCustomError("value_error.url", "URL cannot be parsed") from None
    if parsed.scheme not in ("http", "https"):
        raise PydanticCustomError("value_error.url.scheme", "URL scheme must be http or https")
    if not parsed.host:
        raise PydanticCustomError("value_error.url.host", "URL must have a host")
    return iiif.canonical(value)  # the id a IIIF image is stored under, whichever size the url asks for


def check_metadata(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is None:
        return None
    size = metadata_bytes(value)
    if size > METADATA_MAX:
        raise PydanticCustomError(
            "value_error.metadata_json_too_long", f"metadata json too long ({size} > {METADATA_MAX})"
        )
    return value


ImageUrl = Annotated[str, AfterValidator(check_url)]
Metadata = Annotated[dict[str, Any] | None, AfterValidator(check_metadata)]


def check_stored(value: Any) -> str | bool:
    """A query part's `indexed`: the stored url itself, or a flag for its `url` (one error, not one per kind)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return check_url(value)
    raise PydanticCustomError("value_error.indexed", "indexed is a stored image's url, or true beside `url`")


StoredUrl = Annotated[str | bool, PlainValidator(check_stored), WithJsonSchema(
    {"anyOf": [{"type": "string", "format": "uri"}, {"type": "boolean"}]})]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class AddRequest(Body):
    url: ImageUrl
    metadata: Metadata = None


REFUSE_FROM = ("refuse an image at least this similar (100 × cosine) to a stored one: search_add answers 409 "
               "`near_duplicate`, add_bulk lists it in `duplicates`; absent, nothing is compared")


class SearchAddRequest(AddRequest):
    """search_add: add, unless the url is stored or (with min_similarity) a near copy of the image is."""

    min_similarity: float | None = Field(default=None, ge=0, le=100, description=REFUSE_FROM)


class BulkParams(Body):
    """add_bulk's query string: `?min_similarity=` refuses near copies, of stored images and within the batch."""

    min_similarity: float | None = Field(default=None, ge=0, le=100, description=REFUSE_FROM)


FILTER = ("metadata conditions, all of which must hold (idios/filters.py; README \"Filters\"): `{\"k\": v}` equals, "
          "`{\"k\": [v, ...]}` any of, `{\"a.b\": v}` a nested key, operator objects with eq, ne, gt, gte, lt, lte, "
          "in, nin, contains, contains_any, contains_all, and `and` / `or` (lists of conditions) and `not`")
FILTER_EXAMPLES = [{"collection": "prints", "year": {"gte": 1900, "lt": 1950}},
                   {"or": [{"tags": {"contains": "portrait"}}, {"lang": ["ja", "zh"]}],
                    "not": {"status": "withdrawn"}}]


QUERY_PARTS_MAX = 10


class QueryPart(Body):
    """One part of a weighted search: an image url, a stored url (`indexed`), a text, or the uploaded `image`."""

    url: ImageUrl | None = None
    text: str | None = Field(default=None, min_length=1, max_length=10_000)
    indexed: StoredUrl = Field(default=False, description=(
        "a stored url, whose stored embedding is used (no fetch): `{\"indexed\": url}`; or `true` beside `url`, "
        "as in a single search"))
    image: bool = Field(default=False, description="the image uploaded in the multipart form's `image` field")
    weight: float = Field(default=1.0, ge=-100, le=100, allow_inf_nan=False,
                          description="this part's weight; negative means less like it")

    @model_validator(mode="after")
    def _one_source(self) -> QueryPart:
        if isinstance(self.indexed, str):  # {"indexed": url}: the issue's spelling of {"url": url, "indexed": true}
            if self.url is not None:
                raise PydanticCustomError("value_error.query_part", "give the stored url once: as `indexed`, or as "
                                          "`url` with `indexed: true`")
            self.url, self.indexed = self.indexed, True
        given = [name for name, there in (("url", self.url is not None), ("text", self.text is not None),
                                          ("image", self.image)) if there]
        if len(given) != 1:
            raise PydanticCustomError("value_error.query_part", "a query part holds exactly one of url, indexed, "
                                      f"text or image; got {', '.join(given) or 'none'}")
        if self.indexed and self.url is None:
            raise PydanticCustomError("value_error.query_part", "indexed needs the url of a stored image")
        return self


class SearchRequest(Body):
    url: ImageUrl | None = None
    text: str | None = Field(default=None, min_length=1, max_length=10_000)
    limit: int = Field(default=10, ge=1, le=PAGE_MAX)
    offset: int = Field(default=0, ge=0, le=PAGE_MAX - 1, description=(
        f"hits to skip: pages of `limit` hits concatenate to the unpaged answer (ties in similarity ordered by "
        f"url); offset + limit <= {PAGE_MAX}"))
    filter: dict[str, Any] | None = Field(default=None, description=FILTER, examples=FILTER_EXAMPLES)
    min_similarity: float | None = Field(default=None, ge=0, le=100)
    indexed: bool = False
    queries: list[QueryPart] | None = Field(
        default=None, min_length=1, max_length=QUERY_PARTS_MAX, description=(
            "instead of url / text / image: the normalised weighted sum of these parts' unit vectors is the query "
            "(weights may be negative: less like that part)"),
        examples=[[{"indexed": "http://127.0.0.1/a.jpg", "weight": 1}, {"text": "a dog", "weight": 0.5},
                   {"indexed": "http://127.0.0.1/b.jpg", "weight": -0.5}]])

    group_by: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9_\-]{1,64}(\.[A-Za-z0-9_\-]{1,64}){0,7}$", examples=["iiif_manifest"],
        description="a metadata key (dots for nested keys): the best `group_size` hits of each of its values, the "
                    "`limit` best groups after `offset` groups; a row without the key is a group of its own")
    group_size: int = Field(default=1, ge=1, le=100, description="hits per group, with `group_by`")

    @model_validator(mode="after")
    def _one_answer(self) -> SearchRequest:
        if self.group_by is not None and (self.offset + self.limit) * self.group_size > PAGE_MAX:
            raise PydanticCustomError("value_error.offset", f"(offset + limit) x group_size must be at most "
                                      f"{PAGE_MAX}; got ({self.offset} + {self.limit}) x {self.group_size}")
        if self.queries is not None and (self.url is not None or self.text is not None or self.indexed):
            raise PydanticCustomError("value_error.queries", "queries replace url, text and indexed: give one or "
                                      "the other")
        if self.offset + self.limit > PAGE_MAX:
            raise PydanticCustomError("value_error.offset", f"offset + limit must be at most {PAGE_MAX} "
                                      f"(Milvus answers at most that many hits to one search); got "
                                      f"{self.offset} + {self.limit}")
        return self


class CompareRequest(Body):
    url: ImageUrl | None = None
    other: ImageUrl | None = None


class MetadataEditRequest(Body):
    """update_metadata: one stored row's new metadata; its vector stays."""

    url: ImageUrl
    metadata: Metadata = Field(description="the new metadata (null or {} clears it), or with `merge` a JSON Merge "
                                           "Patch (RFC 7396) of the stored one: null removes a key")
    merge: bool = Field(default=False, description="merge `metadata` into the stored metadata instead of "
                                                   "replacing it")


class RemoveRequest(Body):
    url: ImageUrl


class PageRequest(Body):
    cursor: str | None = Field(default=None, max_length=URL_MAX)
    limit: int = Field(default=PAGE_MAX, ge=1, le=PAGE_MAX)


# How embeddings travel: JSON numbers, or "base64": a string of the little-endian float32 values, base64-encoded
# (OpenAI's embeddings API calls this encoding_format too). Same float32 values either way; base64 is 44% of the
# size (10,000 rows of 512: 28 MB instead of 63 MB) and parses 3-4x faster (parse_restore: 0.15-0.21 s instead
# of 0.64 s here).
EncodingFormat = Literal["float", "base64"]


class DumpRequest(PageRequest):
    limit: int = Field(default=1000, ge=1, le=PAGE_MAX)
    encoding_format: EncodingFormat = "float"


def check_phash(value: str | None) -> str | None:
    if value is None:
        return None
    if not valid_phash(value.lower()):
        raise PydanticCustomError("phash_invalid", "phash must be 16 hex digits, as dump gives it")
    return value.lower()


# A row's perceptual hash as dump gives it (idios/phash.py); absent or null: unknown
PHash = Annotated[str | None, AfterValidator(check_phash),
                  Field(description="the image's 64-bit pHash as dump gives it (16 hex digits)",
                        json_schema_extra={"pattern": "^[0-9a-fA-F]{16}$"})]


class RestoreItem(Body):
    url: ImageUrl
    metadata: Metadata = None
    embedding: list[float] | str = Field(
        min_length=1, description="the vector's numbers, or its little-endian float32 values as one base64 string")
    phash: PHash = None


class EmbeddingNumbers(Body):
    """One restore row's embedding given as numbers: only used to say what is wrong with it."""

    embedding: list[float] = Field(min_length=1)


class RestoreRow(Body):
    """RestoreItem without validating the embedding value by value: numpy checks a whole request at once."""

    url: ImageUrl
    metadata: Metadata = None
    embedding: Any
    phash: PHash = None


B = TypeVar("B", bound=BaseModel)


def fastapi_errors(exc: ValidationError, prefix: tuple[str | int, ...] = ("body",)) -> list[dict[str, Any]]:
    """pydantic's errors in FastAPI's 422 shape (loc starting with "body"), without echoing the input."""
    return [{"loc": [*prefix, *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]


def invalid_json(msg: str) -> errors.RequestInvalid:
    return errors.RequestInvalid([{"loc": ["body"], "msg": msg, "type": "json_invalid"}])


def decode_json(raw: bytes) -> Any:
    """A JSON request body, decoded; an empty or malformed one is a 422 `json_invalid`."""
    if not raw.strip():
        raise invalid_json("A JSON body is required")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid_json(f"Invalid JSON: {exc}") from None


def parse(model: type[B], data: Any, prefix: tuple[str | int, ...] = ("body",)) -> B:
    """Validate `data` as `model`, or raise a 422 listing every problem."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise errors.RequestInvalid(fastapi_errors(exc, prefix)) from None


def item_error(model: type[B], data: Any) -> tuple[B | None, str | None]:
    """Validate one item of a bulk request: the item, or a one-line reason it is invalid."""
    try:
        return model.model_validate(data), None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return None, f"{where}: {first['msg']}" if where else first["msg"]


class DuplicatesRequest(Body):
    """POST /models/{model}/duplicates: without min_similarity, the model's measured default (idios/dedup.py)."""

    min_similarity: float | None = Field(default=None, ge=0, le=100)
    filter: dict[str, Any] | None = Field(default=None, description=FILTER, examples=FILTER_EXAMPLES)


class GroupsRequest(Body):
    """GET /jobs/{id}/groups: `cursor` is the `next` of the page before."""

    cursor: str | None = Field(default=None, pattern=r"^[0-9]{1,9}$")
    limit: int = Field(default=50, ge=1, le=1000)
