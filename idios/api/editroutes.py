"""Edits of stored rows that need no image: their metadata (issue #17). The rules of the write are the Writer's
(idios/writer.py edit_metadata)."""

from __future__ import annotations

from aiohttp import web

from idios import errors
from idios.api.body import read_body
from idios.api.routes import backend, model_of, no_content
from idios.api.schemas import MetadataEditRequest, parse
from idios.writer import MetadataEdit

routes = web.RouteTableDef()


@routes.post("/models/{model}/update_metadata")
async def update_metadata(request: web.Request) -> web.Response:
    """One edit `{url, metadata, merge?}` or a list of them, all or nothing: 404 `not_found` listing the urls not
    stored (`missing`), and then nothing is written."""
    spec = model_of(request)
    be = backend(request)
    data = (await read_body(request)).data
    if isinstance(data, list):
        limit = be.settings.max_bulk_items
        if not 1 <= len(data) <= limit:
            raise errors.RequestInvalid(
                [{"loc": ["body"], "msg": f"a list of 1 to {limit} edits is required", "type": "list_type"}])
        items = [parse(MetadataEditRequest, item, ("body", i)) for i, item in enumerate(data)]
    else:
        items = [parse(MetadataEditRequest, data)]
    edits = [MetadataEdit(i.url, i.metadata, i.merge) for i in items]
    async with be.writer.sending(spec.name, {e.url for e in edits}):  # ordered with adds through this process
        try:
            missing = await be.writer.edit_metadata(spec.name, edits)
        except errors.MetadataTooLong as exc:
            edit = exc.extra.pop("edit", None)
            if isinstance(data, list) and edit is not None:  # name the (last) edit of that url in the list
                exc.loc = ("body", edit, "metadata")
            raise
    if missing:
        raise errors.NotFound(f"{len(missing)} of the urls are not stored in model {spec.name}; nothing was "
                              f"changed", missing=missing)
    return no_content()
