"""Milvus filter expressions built from data, never by pasting user text: every literal is escaped here.

A filter is a condition object: `{"key": value, ...}`, every entry true. A value is an equality, a list (any of),
or an operator object (`{"gte": 1900, "lt": 1950}`, all true); keys nest with dots (`"a.b"`); `and` and `or`
take lists of condition objects, `not` one. parse() checks all of it (a 422 naming what is wrong and where),
normal_form() pushes every `not` down to single conditions, and to_expr() writes the Milvus expression.

Negations are complements: `ne`, `nin` and `not` also match rows that lack the key or hold another type, as the
Milvus server's `not` does. `ne` and `nin` are Milvus's `!=` and `not in`, which do that on Milvus Lite 2.5.1
too; Lite has no `not` at all ("unsupported expr proto node"), so the negation of a range or a `contains` is
left to the caller there (CollectionStore.where leaves out the rows it matches by primary key).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Union

from idios import errors

KEY_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
MAX_IN_VALUES = 1000
MAX_DEPTH = 8  # of nested and / or / not
MAX_CONDITIONS = 100  # single conditions in one filter
COMPARE = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
CONTAINS = {"contains": "json_contains", "contains_any": "json_contains_any", "contains_all": "json_contains_all"}
OPERATORS = ("eq", "ne", *COMPARE, "in", "nin", *CONTAINS)
LOGICAL = ("and", "or", "not")
Loc = tuple[str | int, ...]


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


def scalar_literal(value: Any, loc: Loc) -> str:
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


def url_not_in(urls: Iterable[str]) -> str:
    listed = ", ".join(string_literal(u) for u in urls)
    return f"url not in [{listed}]" if listed else 'url != ""'  # no url is "": the API refuses it


def url_after(cursor: str | None) -> str:
    return "" if not cursor else f"url > {string_literal(cursor)}"


@dataclass(frozen=True)
class Leaf:
    """One condition on one key: `field` is the Milvus path (metadata["a"]["b"]), `literals` are rendered."""

    field: str
    op: str
    literals: tuple[str, ...]

    def expr(self) -> str:
        f, lits = self.field, self.literals
        if self.op in ("eq", "ne"):
            return f"{f} {'==' if self.op == 'eq' else '!='} {lits[0]}"
        if self.op in COMPARE:
            return f"{f} {COMPARE[self.op]} {lits[0]}"
        if self.op == "contains":
            return f"json_contains({f}, {lits[0]})"
        if self.op in CONTAINS:
            if any(lit in ("true", "false") for lit in lits):
                # json_contains_any/all with a boolean fail on Milvus Lite ("unsupported data type VAL_NOT_SET");
                # json_contains of one boolean works, so the list is written out one value at a time
                join = " or " if self.op == "contains_any" else " and "
                return "(" + join.join(f"json_contains({f}, {lit})" for lit in lits) + ")"
            return f"{CONTAINS[self.op]}({f}, [{', '.join(lits)}])"
        # in / nin. Milvus fails on a list that mixes types (an int with a float or a string: "Assert
        # val_case() == kInt64Val", on Lite and on the server), so each type gets a list of its own.
        groups: dict[str, list[str]] = {}
        for lit in lits:
            groups.setdefault(_kind(lit), []).append(lit)
        word, join = ("in", " or ") if self.op == "in" else ("not in", " and ")
        parts = [f"{f} {word} [{', '.join(g)}]" for g in groups.values()]
        return parts[0] if len(parts) == 1 else "(" + join.join(parts) + ")"


def _kind(literal: str) -> str:
    if literal[0] == '"':
        return "str"
    if literal in ("true", "false"):
        return "bool"
    return "int" if re.fullmatch(r"-?[0-9]+", literal) else "float"


@dataclass(frozen=True)
class Not:
    of: Cond


@dataclass(frozen=True)
class AllOf:
    of: tuple[Cond, ...]


@dataclass(frozen=True)
class AnyOf:
    of: tuple[Cond, ...]


Cond = Union[Leaf, Not, AllOf, AnyOf]


class _Count:
    def __init__(self) -> None:
        self.leaves = 0

    def add(self, loc: Loc) -> None:
        self.leaves += 1
        if self.leaves > MAX_CONDITIONS:
            raise errors.FieldError(f"a filter holds at most {MAX_CONDITIONS} conditions", loc=loc)


def parse(conditions: Any, loc: Loc = ("body", "filter")) -> Cond:
    """The checked condition tree of a filter object; errors name the key or operator at fault in `loc`."""
    return _object(conditions, loc, 0, _Count())


def _object(conditions: Any, loc: Loc, depth: int, count: _Count) -> Cond:
    if depth > MAX_DEPTH:
        raise errors.FieldError(f"a filter nests and / or / not at most {MAX_DEPTH} deep", loc=loc)
    if not isinstance(conditions, Mapping) or not conditions:
        raise errors.FieldError("a condition is a non-empty object of keys and values", loc=loc)
    parts: list[Cond] = []
    for key, value in conditions.items():
        here = (*loc, key)
        if key in ("and", "or"):
            if not isinstance(value, list) or not 1 <= len(value) <= MAX_CONDITIONS:
                raise errors.FieldError(f"'{key}' takes a list of 1 to {MAX_CONDITIONS} condition objects",
                                        loc=here)
            subs = tuple(_object(v, (*here, i), depth + 1, count) for i, v in enumerate(value))
            parts.append(subs[0] if len(subs) == 1 else (AllOf(subs) if key == "and" else AnyOf(subs)))
        elif key == "not":
            parts.append(Not(_object(value, here, depth + 1, count)))
        else:
            parts.extend(_key(key, value, here, count))
    return parts[0] if len(parts) == 1 else AllOf(tuple(parts))


def _key(key: str, value: Any, loc: Loc, count: _Count) -> Iterator[Leaf]:
    path = key.split(".")
    if not all(KEY_RE.match(p) for p in path) or len(path) > 8:
        raise errors.FieldError("filter keys are letters, digits, '_' or '-', nested with '.'", loc=loc)
    field = "metadata" + "".join(f"[{string_literal(p)}]" for p in path)
    if not isinstance(value, Mapping):
        count.add(loc)
        if isinstance(value, list):
            yield Leaf(field, "in", _listed(value, loc))
        else:
            yield Leaf(field, "eq", (scalar_literal(value, loc),))
        return
    if not value:
        raise errors.FieldError(f"an operator object holds one or more of {', '.join(OPERATORS)}", loc=loc)
    for op, operand in value.items():
        here = (*loc, op)
        if op not in OPERATORS:
            raise errors.FieldError(f"unknown filter operator '{op}'; known: {', '.join(OPERATORS)}", loc=here)
        count.add(here)
        if op in ("in", "nin", "contains_any", "contains_all"):
            yield Leaf(field, op, _listed(operand, here))
        elif op in COMPARE:
            if isinstance(operand, bool) or not isinstance(operand, int | float | str):
                raise errors.FieldError(f"'{op}' compares with a number or a string", loc=here)
            yield Leaf(field, op, (scalar_literal(operand, here),))
        else:
            if isinstance(operand, list | Mapping):
                raise errors.FieldError(f"'{op}' takes one string, number or boolean", loc=here)
            yield Leaf(field, op, (scalar_literal(operand, here),))


def _listed(values: Any, loc: Loc) -> tuple[str, ...]:
    if not isinstance(values, list) or not 1 <= len(values) <= MAX_IN_VALUES:
        raise errors.FieldError(f"a filter list holds 1 to {MAX_IN_VALUES} values", loc=loc)
    return tuple(scalar_literal(v, (*loc, i)) for i, v in enumerate(values))


_OPPOSITE = {"eq": "ne", "ne": "eq", "in": "nin", "nin": "in"}


def normal_form(cond: Cond, negate: bool = False) -> Cond:
    """The same condition with `not` only right above a Leaf that has no negated operator (a range or a
    contains): De Morgan's laws, and eq/ne, in/nin turned into each other."""
    if isinstance(cond, Not):
        return normal_form(cond.of, not negate)
    if isinstance(cond, AllOf | AnyOf):
        subs = tuple(normal_form(c, negate) for c in cond.of)
        return (AnyOf(subs) if isinstance(cond, AllOf) else AllOf(subs)) if negate else type(cond)(subs)
    if not negate:
        return cond
    if cond.op in _OPPOSITE:
        return Leaf(cond.field, _OPPOSITE[cond.op], cond.literals)
    return Not(cond)


def negated_leaves(cond: Cond) -> list[Leaf]:
    """The Leaves a normal_form() condition negates with a `not`."""
    if isinstance(cond, Not):
        assert isinstance(cond.of, Leaf), "negated_leaves() takes a normal_form() condition"
        return [cond.of]
    if isinstance(cond, AllOf | AnyOf):
        return [leaf for c in cond.of for leaf in negated_leaves(c)]
    return []


def native_not(leaf: Leaf) -> str:
    return f"not ({leaf.expr()})"


def to_expr(cond: Cond, negation: Callable[[Leaf], str] = native_not) -> str:
    """The Milvus expression of a normal_form() condition; `negation` writes each `not` over a Leaf."""
    if isinstance(cond, Leaf):
        return cond.expr()
    if isinstance(cond, Not):
        assert isinstance(cond.of, Leaf), "to_expr() takes a normal_form() condition"
        return negation(cond.of)
    word = " and " if isinstance(cond, AllOf) else " or "
    return word.join(f"({to_expr(c, negation)})" if isinstance(c, AllOf | AnyOf) else to_expr(c, negation)
                     for c in cond.of)
