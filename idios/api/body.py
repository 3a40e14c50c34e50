"""Reading request bodies: JSON, or multipart/form-data with uploaded image files."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_request import FileField

from idios import errors
from idios.api.schemas import decode_json

JSON_FIELDS = {"metadata", "filter", "queries"}
FILE_FIELDS = {"image", "other_image"}


@dataclass
class Body:
    data: Any
    files: dict[str, bytes] = field(default_factory=dict)


async def read_body(request: web.Request, allow_files: bool = False) -> Body:
    """The decoded body. Uploaded files are only accepted on routes that take an image."""
    if allow_files and request.content_type == "multipart/form-data":
        return await _read_form(request)
    return Body(decode_json(await read_json_bytes(request)))


async def read_json_bytes(request: web.Request) -> bytes:
    """The raw body of a route that takes JSON only (a form with files is refused), not decoded yet."""
    if request.content_type == "multipart/form-data":
        raise errors.UnsupportedMediaType("This route takes a JSON body")
    return await request.read()


async def _read_form(request: web.Request) -> Body:
    try:
        form = await request.post()
    except (ValueError, HttpProcessingError) as exc:  # aiohttp's multipart reader on a malformed form
        raise errors.FormInvalid(f"the multipart/form-data body cannot be read: {str(exc).splitlines()[0][:200]}") from None
    data: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    for name, value in form.items():
        if isinstance(value, FileField):
            if name not in FILE_FIELDS:
                raise errors.RequestInvalid(
                    [{"loc": ["body", name], "msg": "unexpected file field", "type": "extra_forbidden"}]
                )
            files[name] = value.file.read()
        elif name in FILE_FIELDS:
            files[name] = value.encode() if isinstance(value, str) else bytes(value)
        elif name in JSON_FIELDS:
            try:
                data[name] = orjson.loads(value) if value else None
            except orjson.JSONDecodeError:
                raise errors.RequestInvalid(
                    [{"loc": ["body", name], "msg": f"{name} must be JSON", "type": "json_invalid"}]
                ) from None
        else:
            data[name] = value
    return Body(data, files)
