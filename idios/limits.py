"""The service's limits that more than one module needs, defined once."""

from __future__ import annotations

URL_MAX = 2083  # characters of an image url (the longest url browsers accept); the primary key's max_length
METADATA_MAX = 65535  # UTF-8 bytes of one row's metadata JSON: a Milvus server refuses JSON over 65,536 bytes
PAGE_MAX = 16384  # rows of one answer (search limit, urls/dump page): Milvus caps offset + limit of one query
