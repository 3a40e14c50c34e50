"""Milvus filter expressions built from data, never by pasting user text: every literal is escaped here."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from idios import errors

KEY_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
MAX_IN_VALUES = 1000


def string_literal(value: str) -> str:
    """A double-quoted Milvus string literal holding exactly `value`."""
    escaped = (
        value.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )
    return f'"{escaped}"'


def scalar_literal(value: Any, loc: tuple[str | int, ...]) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise errors.FieldError("filter values must be finite numbers", loc=loc)
        return repr(value)
    if isinstance(value, str):
        return string_literal(value)
    raise errors.FieldError("filter values must be strings, numbers, booleans or lists of those", loc=loc)


def url_in(urls: Iterable[str]) -> str:
    """`url in [...]` for exact primary-key matches."""
    return "url in [" + ", ".join(string_literal(u) for u in urls) + "]"


def url_after(cursor: str | None) -> str:
    return "" if not cursor else f"url > {string_literal(cursor)}"


def metadata_filter(conditions: Mapping[str, Any]) -> str:
    """`{"key": value}` → `metadata["key"] == value`; a list means any of; keys nest with dots ("a.b")."""
    parts = []
    for key, value in conditions.items():
        loc: tuple[str | int, ...] = ("body", "filter", key)
        path = key.split(".")
        if not all(KEY_RE.match(p) for p in path) or len(path) > 8:
            raise errors.FieldError("filter keys are letters, digits, '_' or '-', nested with '.'", loc=loc)
        field = "metadata" + "".join(f"[{string_literal(p)}]" for p in path)
        if isinstance(value, list):
            if not value or len(value) > MAX_IN_VALUES:
                raise errors.FieldError(f"a filter list holds 1 to {MAX_IN_VALUES} values", loc=loc)
            parts.append(f"{field} in [{', '.join(scalar_literal(v, loc) for v in value)}]")
        else:
            parts.append(f"{field} == {scalar_literal(value, loc)}")
    return " and ".join(parts)
