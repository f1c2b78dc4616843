"""The house's rules, read from the code: which wing may import which, and who alone imports mlflow, hyperopt and ray.

Every import counts, a lazy one inside a function too: a lazy import keeps `--help` fast, it does not
make a wrong dependency right.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "src" / "fmnist_hpo"
ROOT = "root"  # the modules directly in fmnist_hpo/: errors, records, selection, tags, files and the like

# wing -> the wings it may import (itself always); a wing never imports one above it
MAY_IMPORT = {
    ROOT: set(),
    "config": {ROOT},
    "data": {ROOT, "config"},
    "training": {ROOT, "config", "data"},
    "tracking": {ROOT, "config", "data", "training"},
    "search": {ROOT, "config", "data", "training", "tracking"},
    "analysis": {ROOT, "config", "tracking"},
    "modelops": {ROOT, "config", "data", "training", "tracking"},
    "cli": {ROOT, "config", "data", "training", "tracking", "search", "analysis", "modelops"},
}
# a third-party package -> the only wings that import it
ONLY_IN = {"mlflow": {"tracking"}, "hyperopt": {"search"}, "ray": {"search"}}
NEVER_IN = {"torch": {"config", "analysis"}, "torchvision": {"config", "analysis"}}


def wing_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else ROOT


def imported(source: str) -> list[tuple[int, str]]:
    """(line, dotted module) for every import in a source, at module level or inside a function."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:  # a relative import hides its wing
            found.append((node.lineno, "." * node.level + (node.module or "")))
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, node.module))
            if node.module == "fmnist_hpo":  # `from fmnist_hpo import errors` names root modules
                found += [(node.lineno, f"fmnist_hpo.{alias.name}") for alias in node.names]
    return found


def target_wing(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "fmnist_hpo" or len(parts) == 1:
        return None
    return parts[1] if (PACKAGE / parts[1]).is_dir() else ROOT


def broken_rules(wing: str, source: str) -> list[str]:
    wrong = []
    for line, module in imported(source):
        if module.startswith("."):
            wrong.append(f"line {line}: relative import {module}: name the wing (fmnist_hpo.<wing>.<module>)")
            continue
        target = target_wing(module)
        if target is not None and target != wing and target not in MAY_IMPORT[wing]:
            wrong.append(f"line {line}: {wing} imports {module}")
        top = module.split(".")[0]
        if top in ONLY_IN and wing not in ONLY_IN[top]:
            wrong.append(f"line {line}: {top} is imported only in {sorted(ONLY_IN[top])}, not in {wing}")
        if wing in NEVER_IN.get(top, set()):
            wrong.append(f"line {line}: {wing} never imports {top}")
    return wrong


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__main__.py")


def test_every_module_lives_in_a_known_wing():
    assert {wing_of(p) for p in MODULES} == set(MAY_IMPORT)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_downward(path: Path):
    wrong = broken_rules(wing_of(path), path.read_text())
    assert not wrong, f"{path.relative_to(PACKAGE)}:\n" + "\n".join(wrong)


def test_the_rules_catch_an_upward_import_a_lazy_one_and_a_foreign_library():
    source = "from fmnist_hpo.tracking import writer\nfrom fmnist_hpo import errors\n\ndef f():\n    import mlflow\n"
    assert broken_rules("training", source) == [
        "line 1: training imports fmnist_hpo.tracking",
        "line 5: mlflow is imported only in ['tracking'], not in training",
    ]
    assert broken_rules(ROOT, "from fmnist_hpo.config.sections import Config\n") == [
        "line 1: root imports fmnist_hpo.config.sections"]
    assert broken_rules("analysis", "import torch\n") == ["line 1: analysis never imports torch"]
    assert broken_rules("search", "from .sweep import Sweep\n") == [
        "line 1: relative import .sweep: name the wing (fmnist_hpo.<wing>.<module>)"]
