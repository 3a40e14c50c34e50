"""The service's limits that more than one module needs, defined once."""

from __future__ import annotations

from typing import Any

import orjson

URL_MAX = 2083  # characters of an image url (the longest url browsers accept); the primary key's max_length
METADATA_MAX = 65535  # UTF-8 bytes of one row's metadata JSON: a Milvus server refuses JSON over 65,536 bytes
PAGE_MAX = 16384  # rows of one answer (search limit, urls/dump page): Milvus caps offset + limit of one query


def metadata_bytes(metadata: Any) -> int:
    """The size METADATA_MAX bounds: UTF-8 bytes of the metadata as JSON (the request's check, an edit's merge)."""
    return len(orjson.dumps(metadata))
