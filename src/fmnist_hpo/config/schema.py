"""A JSON Schema (draft 2020-12) of the experiment spec, generated from config.py's dataclasses.

Editors use it for completion, hover text and red squiggles (`# yaml-language-server: $schema=...`).
The spec is still validated by config.py's own validator: the training engine must import where
only torch, numpy and pyyaml are installed, and the validator's cross-field checks (a search
value valid for its key, conv_dropout rates per block) are beyond what a schema says.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal

from fmnist_hpo.config import spec
from fmnist_hpo.config.space import FIXED_KEYS, FIXED_SECTIONS, PRIMITIVES

SCHEMA_URI = "https://json-schema.org/draft/2020-12/schema"
SHIPPED_PATH = "schema/fmnist-spec.schema.json"
_BOUNDS = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}
_SCALARS = {bool: "boolean", int: "integer", float: "number", str: "string"}


def spec_schema() -> dict[str, Any]:
    """The whole spec: every section closed to unknown keys, the search space keyed by dotted config keys."""
    schema = {"$schema": SCHEMA_URI, "$id": "https://fmnist-hpo.invalid/fmnist-spec.schema.json",
              "title": "fmnist-hpo experiment spec",
              "description": "One experiment: data, model, training, search space and MLflow settings. "
                             "Every key is optional.",
              **section_schema(spec.Config),
              "$defs": {f"{kind}_arguments": primitive_arguments(kind) for kind in PRIMITIVES if kind != "choice"}}
    schema["properties"]["experiment"]["pattern"] = f"^{spec.EXPERIMENT_NAME.pattern}$"
    schema["properties"]["search"]["properties"]["space"] = space_schema()
    return schema


def section_schema(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    properties = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            properties[f.name] = section_schema(tp)
        else:
            properties[f.name] = field_schema(f, tp)
    return {"type": "object", "additionalProperties": False, "properties": properties}


def field_schema(f: dataclasses.Field, tp: Any) -> dict[str, Any]:
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return {"description": f.metadata.get("doc", ""), **value_schema(tp, f.metadata), "default": default}


def value_schema(tp: Any, bounds: typing.Mapping[str, Any]) -> dict[str, Any]:
    """The schema of one value of type tp, with the field's numeric bounds on every number in it."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [value_schema(a, bounds) for a in args if a is not type(None)]
        if type(None) in args:
            options.append({"type": "null"})
        return options[0] if len(options) == 1 else {"anyOf": options}
    if origin is Literal:
        return {"enum": list(args)}
    if origin is list:
        return {"type": "array", "items": value_schema(args[0], bounds)}
    if origin is dict:
        return {"type": "object"}
    schema: dict[str, Any] = {"type": _SCALARS[tp]}
    if tp in (int, float):
        schema.update({_BOUNDS[key]: bounds[key] for key in _BOUNDS if key in bounds})
    return schema


def space_schema() -> dict[str, Any]:
    """search.space: each key a config key a search may vary, its value one primitive."""
    hints = flat_fields()
    searchable = {key: item for key, item in hints.items()
                  if key not in FIXED_KEYS and not key.startswith(FIXED_SECTIONS)}
    return {
        "description": spec.field_docs()["search.space"], "default": {}, "type": "object",
        "additionalProperties": False,
        "properties": {key: primitive_schema(f, tp) for key, (f, tp) in searchable.items()},
    }


def flat_fields(cls: type = spec.Config, prefix: str = "") -> dict[str, tuple[dataclasses.Field, Any]]:
    """Dotted key -> (field, type) for every leaf of the spec."""
    hints = typing.get_type_hints(cls)
    found: dict[str, tuple[dataclasses.Field, Any]] = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            found.update(flat_fields(hints[f.name], f"{prefix}{f.name}."))
        else:
            found[f"{prefix}{f.name}"] = (f, hints[f.name])
    return found


def primitive_schema(f: dataclasses.Field, tp: Any) -> dict[str, Any]:
    """One Hyperopt primitive for this key; choice options must be valid values of the key itself."""
    choice = {"type": "array", "minItems": 1, "items": value_schema(tp, f.metadata)}
    properties = {kind: {"$ref": f"#/$defs/{kind}_arguments"} for kind in PRIMITIVES if kind != "choice"}
    return {"description": f.metadata.get("doc", ""), "type": "object", "minProperties": 1, "maxProperties": 1,
            "additionalProperties": False, "properties": {"choice": choice, **properties}}


def primitive_arguments(kind: str) -> dict[str, Any]:
    names = PRIMITIVES[kind]
    number = {"type": "integer" if kind == "randint" else "number"}
    return {"description": f"{kind}: [{', '.join(names)}]", "type": "array", "prefixItems": [number] * len(names),
            "minItems": len(names), "maxItems": len(names)}


def schema_text() -> str:
    """What `fmnist schema` prints and schema/fmnist-spec.schema.json holds."""
    return json.dumps(spec_schema(), indent=2, ensure_ascii=False) + "\n"
