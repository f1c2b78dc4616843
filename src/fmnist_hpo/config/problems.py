"""Pydantic's validation errors as the spec's problems: one line each, `dotted.key: what is wrong`.

One line per key: the branches of a union (`int | "auto"`) and the items of a list report on the
key itself, and a value that has a right type but breaks a bound is told the bound, not the types.
"""

from __future__ import annotations

import difflib
import itertools
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails


class RulesBroken(ValueError):
    """What a model validator raises: the rules between keys that it found broken, each a whole problem line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


# a value of the wrong type: what it must be instead
WANTS = {
    "bool_type": "must be true or false",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "literal_error": "must be one of",
}
BOUNDS = {"greater_than_equal": ("ge", ">="), "greater_than": ("gt", ">"),
          "less_than_equal": ("le", "<="), "less_than": ("lt", "<")}


def problems_of(error: ValidationError, model: type[BaseModel]) -> list[str]:
    """Every problem in error, in the order of the spec's keys."""
    problems: list[str] = []
    located = [(*_locate(model, detail["loc"]), detail) for detail in error.errors()]
    for key, group in itertools.groupby(located, key=lambda row: row[0]):
        rows = list(group)
        details = [detail for *_, detail in rows]
        broken = [detail["ctx"]["error"] for detail in details if _rules_broken(detail)]
        if broken:
            problems += [line for rules in broken for line in rules.problems]
        else:
            _, field, parent, _ = rows[0]
            problems.append(f"{key}: {_what_is_wrong(details, field, parent, key)}")
    return problems


def _rules_broken(detail: ErrorDetails) -> bool:
    return isinstance(detail.get("ctx", {}).get("error"), RulesBroken)


def _locate(model: type[BaseModel], loc: tuple[int | str, ...]) -> tuple[str, Any, type[BaseModel]]:
    """(dotted key, the annotation of its field, the model holding it) for an error's location; union
    branches, list positions and mapping keys after the field belong to its value, not its name."""
    names: list[str] = []
    field: Any = model
    parent = model
    for part in loc:
        if not _is_model(field):
            break
        parent = field
        names.append(str(part))
        info = field.model_fields.get(part) if isinstance(part, str) else None
        field = info.annotation if info else None
    return ".".join(names) or "config", field, parent


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _what_is_wrong(details: list[ErrorDetails], field: Any, parent: type[BaseModel], key: str) -> str:
    if details[0]["type"] == "extra_forbidden":
        name = str(details[0]["loc"][-1])  # the key as written, dots and all
        hint = difflib.get_close_matches(name, parent.model_fields, n=1)
        prefix = key[: -len(name)]
        return "unknown key" + (f" (did you mean '{prefix}{hint[0]}'?)" if hint else "")
    misfits = [detail for detail in details if detail["type"] not in WANTS]
    if misfits:  # the value has a right type and breaks a bound: the bound is the problem
        return _misfit(misfits[0])
    wants = dict.fromkeys(_want(detail["type"], field) for detail in details)
    one_plain_type = len(wants) == 1 and details[0]["type"] != "literal_error"
    return f"{' or '.join(wants)}{', ' if one_plain_type else '; '}got {describe(details[0]['input'])}"


def _want(error_type: str, field: Any) -> str:
    if error_type == "literal_error":
        return f"{WANTS[error_type]} {', '.join(map(str, literal_options(field)))}"
    return WANTS[error_type]


def literal_options(annotation: Any) -> list[Any]:
    """The values the Literal types in an annotation allow (through unions and Annotated)."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return list(typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType, typing.Annotated):
        return [value for arg in typing.get_args(annotation) for value in literal_options(arg)]
    return []


def _misfit(detail: ErrorDetails) -> str:
    kind, value, ctx = detail["type"], detail["input"], detail.get("ctx", {})
    if kind in BOUNDS:
        name, word = BOUNDS[kind]
        return f"must be {word} {ctx[name]:g}, got {shown(value)}"
    if kind == "finite_number":
        return f"must be a finite number, got {shown(value)}"
    if kind == "string_too_long":
        return f"at most {ctx['max_length']} characters, got {len(value)}"
    if kind == "value_error":
        return str(ctx["error"])
    return detail["msg"]


def describe(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {shown(value)}"


def shown(value: Any) -> str:
    """repr(value), cut: a problem is one line, and a long value is never printed whole."""
    text = repr(value)
    return text if len(text) <= 80 else text[:72] + " ..."
