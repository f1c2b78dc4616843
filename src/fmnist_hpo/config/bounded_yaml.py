"""YAML for specs and `--set` values, bounded: a spec is small, so a hostile one costs no memory or time.

PyYAML's safe loader runs no code, but 400 bytes of nested aliases (a "billion laughs") stand for
billions of values once anything walks them, a deep nesting overflows the composer's recursion, and
a 50 MB list is read whole. Here the document's size, its nesting and the number of values its
aliases expand to are checked on the composed node graph, before any Python object is built.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import yaml

MAX_SPEC_BYTES = 1_000_000  # the largest shipped spec is about 5 KB
MAX_DEPTH = 64
MAX_VALUES = 100_000  # scalars, lists and mappings, counting each use of an alias in full


class SpecTooLarge(ValueError):
    """A YAML document over the bounds; the message says which bound, never the content."""


class _BoundedLoader(yaml.SafeLoader):
    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise SpecTooLarge(f"nested more than {MAX_DEPTH} levels deep")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return self.construct_document(node)


def _check_expansion(root: yaml.Node) -> None:
    """Raise if the node graph, with every alias expanded, holds more than MAX_VALUES values (or a cycle)."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in visiting:
            raise SpecTooLarge("an alias refers to the value that contains it")
        visiting.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        visiting.discard(key)
        if total > MAX_VALUES:
            raise SpecTooLarge(f"expands to more than {MAX_VALUES} values (through aliases or sheer size)")
        sizes[key] = total
        return total

    size(root)


def _bracket_depth(text: str) -> int:
    """How deep [ and { nest, at most (brackets inside strings count too): checked before parsing, since
    PyYAML's scanner reads a deep flow collection ahead in time quadratic in its depth."""
    brackets = np.frombuffer(re.sub(r"[^\[\]{}]+", "", text).encode(), dtype=np.uint8)
    if not brackets.size:
        return 0
    steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())  # a stray closer lowers it: the composer's own depth check remains


def load(text: str) -> Any:
    """The document in text, read like yaml.safe_load within the bounds above."""
    if len(text) > MAX_SPEC_BYTES:
        raise SpecTooLarge(f"{len(text)} characters, more than a spec may have ({MAX_SPEC_BYTES})")
    if _bracket_depth(text) > MAX_DEPTH:
        raise SpecTooLarge(f"nested more than {MAX_DEPTH} levels deep")
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
