"""A spec from its file and `--set` overrides, and a Config as plain data: a mapping, YAML, flat params, a hash.

A spec is read as plain YAML, overrides are merged into that raw mapping, and only then is the
whole thing validated, so a `--set` value or a sampled search point passes the same checks as
the file itself.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from fmnist_hpo.config import bounded_yaml
from fmnist_hpo.config.problems import shown
from fmnist_hpo.config.sections import Config, validate
from fmnist_hpo.errors import ConfigError

SPEC_SUFFIXES = (".yaml", ".yml")
SPEC_FOLDER = Path("configs")


def to_dict(cfg: Config) -> dict[str, Any]:
    return cfg.model_dump()


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}; the search space stays one value."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path != "search.space":
            flat.update(flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def config_hash(cfg: Config) -> str:
    return hash_of(to_dict(cfg))


# keys added after sweeps were recorded: at their default they are left out of a hash, so a sweep
# interrupted before the key existed keeps its identity and resumes
ADDED_LATER = {("data", "dataset"): "fashion-mnist"}


def hash_of(raw: dict[str, Any]) -> str:
    raw = copy.deepcopy(raw)
    for (section, key), default in ADDED_LATER.items():
        if isinstance(raw.get(section), dict) and raw[section].get(key) == default:
            del raw[section][key]
    text = json.dumps(raw, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(["is a directory; give the experiment spec file (YAML) inside it"], str(path))
    if not path.is_file():
        suggestion = spec_like(path)
        raise ConfigError([f"no such file{f' (did you mean {suggestion}?)' if suggestion else ''}"], str(path))
    if path.stat().st_size > bounded_yaml.MAX_SPEC_BYTES:
        raise ConfigError([f"{path.stat().st_size} bytes: too large to be a spec (at most {bounded_yaml.MAX_SPEC_BYTES})"],
                          str(path))
    try:
        raw = bounded_yaml.load(path.read_text())
    except bounded_yaml.SpecTooLarge as exc:
        raise ConfigError([f"too large to be a spec: {exc}"], str(path)) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError([f"not valid YAML: {where}{exc.problem}"], str(path)) from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError([f"not valid YAML: {exc}"], str(path)) from None
    if raw is None:
        raise ConfigError(["the file is empty"], str(path))
    if not isinstance(raw, dict):
        raise ConfigError([f"must be a mapping of sections, got {type(raw).__name__}"], str(path))
    return raw


def spec_like(path: Path) -> str | None:
    """The existing spec a missing path most likely meant: the other YAML suffix, a bare name in
    configs/, else a spec whose name starts with it or is close to it, beside it (or in configs/)."""
    stem = path.stem if path.suffix in SPEC_SUFFIXES else path.name
    folders = [path.parent] + ([SPEC_FOLDER] if path.parent == Path(".") else [])
    for folder in folders:
        for suffix in SPEC_SUFFIXES:
            if (folder / f"{stem}{suffix}").is_file():
                return str(folder / f"{stem}{suffix}")
    specs = {p.stem: p for folder in folders if folder.is_dir() for suffix in SPEC_SUFFIXES
             for p in sorted(folder.glob(f"*{suffix}"))}
    starting = sorted(name for name in specs if name.startswith(stem))
    if len(starting) > 1:  # exp1 -> exp10 … exp13: no one of them is the likelier
        listed = [str(specs[name]) for name in starting[:4]]
        return "one of " + ", ".join(listed) + (", …" if len(starting) > 4 else "")
    close = starting or difflib.get_close_matches(stem, specs, n=1, cutoff=0.6)
    return str(specs[close[0]]) if close else None


def parse_override(text: str) -> tuple[str, Any]:
    """'train.epochs=3' -> ('train.epochs', 3); the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"override {shown(text)} must look like key=value"], "--set")
    try:
        return key.strip(), bounded_yaml.load(value)
    except bounded_yaml.SpecTooLarge as exc:
        raise ConfigError([f"override of {shown(key.strip())}: value too large ({exc})"], "--set") from None
    except yaml.YAMLError:
        raise ConfigError([f"override {shown(text)}: value is not valid YAML"], "--set") from None


def key_parts(key: str) -> list[str]:
    """'a.b' -> ['a', 'b']; a search-space key keeps its dots after 'search.space.'."""
    parts = key.split(".")
    if parts[:2] == ["search", "space"] and len(parts) > 2:
        return ["search", "space", ".".join(parts[2:])]
    return parts


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set raw['a']['b'] for key 'a.b', making the mappings on the way."""
    parts = key_parts(key)
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(raw)
    for key, value in overrides.items():
        set_dotted(merged, key, value)
    return merged


def load(path: str | Path, overrides: list[str] | None = None, flags: dict[str, str] | None = None) -> Config:
    """The validated spec at path with overrides ('key=value') applied; a problem under an overridden
    key is blamed on the option that set it: flags maps such keys to their option (default `--set`)."""
    raw = read_yaml(path)
    parsed = dict(parse_override(o) for o in overrides or [])
    try:
        return validate(apply_overrides(raw, parsed), source=str(path))
    except ConfigError as exc:
        sources = [_source_of(problem, raw, parsed, flags or {}, str(path)) for problem in exc.problems]
        raise ConfigError(exc.problems, str(path), sources) from None


def _source_of(problem: str, raw: dict[str, Any], overridden: dict[str, Any], flags: dict[str, str],
               file_source: str) -> str:
    """Who wrote the key a problem is about: an override that set it or a key under it, or one that made
    it (`--set trian.epochs=2` makes the section trian, which the file lacks); else the file."""
    key = problem.split(": ", 1)[0]
    for overridden_key in overridden:
        made = overridden_key.startswith(f"{key}.") and not _holds(raw, key)
        if made or key == overridden_key or key.startswith(f"{overridden_key}."):
            return flags.get(overridden_key, "--set")
    return file_source


def _holds(raw: dict[str, Any], key: str) -> bool:
    node: Any = raw
    for part in key_parts(key):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True
