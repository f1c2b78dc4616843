"""A JSON Schema (draft 2020-12) of the experiment spec, read from the section models' own schema.

Editors use it for completion, hover text and red squiggles (`# yaml-language-server: $schema=...`).
Pydantic's schema has the keys, types, bounds, defaults and help texts; added here are the search
space (each key a search may vary, with one primitive whose choices are valid values of that key)
and the sections written in place, so a key's node sits at its dotted path. The rules between keys
(one dropout rate per block, a searched value valid for its key) stay with validation.
"""

from __future__ import annotations

import json
from typing import Any

from fmnist_hpo.config.sections import Config, field_docs
from fmnist_hpo.config.space import FIXED_KEYS, FIXED_SECTIONS, PRIMITIVES

SCHEMA_URI = "https://json-schema.org/draft/2020-12/schema"
SHIPPED_PATH = "schema/fmnist-spec.schema.json"


def spec_schema() -> dict[str, Any]:
    """The whole spec: every section closed to unknown keys, the search space keyed by dotted config keys."""
    generated = Config.model_json_schema()
    sections = in_place(generated, generated.pop("$defs", {}))
    schema = {"$schema": SCHEMA_URI, "$id": "https://fmnist-hpo.invalid/fmnist-spec.schema.json",
              "title": "fmnist-hpo experiment spec",
              "description": "One experiment: data, model, training, search space and MLflow settings. "
                             "Every key is optional.",
              **sections,
              "$defs": {f"{kind}_arguments": primitive_arguments(kind) for kind in PRIMITIVES if kind != "choice"}}
    search = schema["properties"]["search"]["properties"]
    search["space"] = space_schema(schema, search["space"])
    return schema


def in_place(node: Any, defs: dict[str, Any]) -> Any:
    """node with each $ref replaced by its definition, and without pydantic's titles (the descriptions say more)."""
    if isinstance(node, list):
        return [in_place(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        return in_place(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
    kept = {}
    for key, value in node.items():
        if key == "properties":
            kept[key] = {name: in_place(child, defs) for name, child in value.items()}
        elif key != "title":
            kept[key] = value if key == "default" else in_place(value, defs)
    return kept


def space_schema(schema: dict[str, Any], generated: dict[str, Any]) -> dict[str, Any]:
    """search.space: each key a config key a search may vary, its value one primitive."""
    searchable = [key for key in field_docs() if key not in FIXED_KEYS and not key.startswith(FIXED_SECTIONS)]
    return {"description": generated["description"], "default": {}, "type": "object", "additionalProperties": False,
            "properties": {key: primitive_schema(node_at(schema, key)) for key in searchable}}


def node_at(schema: dict[str, Any], key: str) -> dict[str, Any]:
    node = schema
    for part in key.split("."):
        node = node["properties"][part]
    return node


def primitive_schema(key_node: dict[str, Any]) -> dict[str, Any]:
    """One Hyperopt primitive for this key; choice options must be valid values of the key itself."""
    value = {name: part for name, part in key_node.items() if name not in ("description", "default")}
    choice = {"type": "array", "minItems": 1, "items": value}
    properties = {kind: {"$ref": f"#/$defs/{kind}_arguments"} for kind in PRIMITIVES if kind != "choice"}
    return {"description": key_node["description"], "type": "object", "minProperties": 1, "maxProperties": 1,
            "additionalProperties": False, "properties": {"choice": choice, **properties}}


def primitive_arguments(kind: str) -> dict[str, Any]:
    names = PRIMITIVES[kind]
    number = {"type": "integer" if kind == "randint" else "number"}
    return {"description": f"{kind}: [{', '.join(names)}]", "type": "array", "prefixItems": [number] * len(names),
            "minItems": len(names), "maxItems": len(names)}


def schema_text() -> str:
    """What `fmnist schema` prints and schema/fmnist-spec.schema.json holds."""
    return json.dumps(spec_schema(), indent=2, ensure_ascii=False) + "\n"
