"""`fmnist schema`: the JSON Schema editors use agrees with the shipped file, the configs and the spec's pydantic sections."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fmnist_hpo.cli.app import app
from fmnist_hpo.config.loading import flatten, to_dict
from fmnist_hpo.config.schema import SHIPPED_PATH, spec_schema
from fmnist_hpo.config.sections import field_docs, validate
from fmnist_hpo.errors import ConfigError

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
MODELINE = "# yaml-language-server: $schema=../schema/fmnist-spec.schema.json"
runner = CliRunner()


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = spec_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_the_shipped_schema_is_what_the_command_prints(tmp_path: Path):
    printed = runner.invoke(app, ["schema"])
    assert printed.exit_code == 0
    assert printed.stdout == (ROOT / SHIPPED_PATH).read_text(), "regenerate: fmnist schema -o " + SHIPPED_PATH
    written = runner.invoke(app, ["schema", "--output", str(tmp_path / "s.json")])
    assert written.exit_code == 0 and (tmp_path / "s.json").read_text() == printed.stdout


def test_an_unwritable_output_is_one_line(tmp_path: Path):
    result = runner.invoke(app, ["schema", "--output", str(tmp_path / "missing" / "s.json")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "cannot write the schema" in result.stderr


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_names_and_passes_the_schema(path: Path, validator: jsonschema.Draft202012Validator):
    assert path.read_text().splitlines()[0] == MODELINE
    assert (path.parent / MODELINE.split("=", 1)[1]).resolve() == (ROOT / SHIPPED_PATH).resolve()
    assert [e.message for e in validator.iter_errors(yaml.safe_load(path.read_text()))] == []


@pytest.mark.parametrize("raw", [
    {"trian": {}},                                           # unknown section
    {"train": {"epochs": 0}},                                # ge bound
    {"train": {"lr": 0}},                                    # gt bound
    {"model": {"conv_dropout": [0.1, 1.0, 0.1]}},            # lt bound on a list item
    {"train": {"device": "tpu"}},                            # Literal enum
    {"data": {"download": "yes"}},                           # bool
    {"train": {"patience": 1.5}},                            # int or null
    {"experiment": "no spaces allowed"},                     # the name pattern
    {"mlflow": {"system_metrics": 1}},                       # the new MLflow switch
    {"search": {"space": {"train.lrr": {"uniform": [0, 1]}}}},             # unknown space key
    {"search": {"space": {"search.max_evals": {"choice": [1, 2]}}}},       # a key a search must not vary
    {"search": {"space": {"train.lr": {"uniform": [0.1]}}}},               # wrong arity
    {"search": {"space": {"train.lr": {"uniform": [0.1, 0.2], "choice": [1]}}}},  # two primitives
    {"search": {"space": {"train.device": {"choice": ["cpu", "tpu"]}}}},   # a choice the key rejects
    {"search": {"space": {"model.filters": {"randint": [1.5, 8]}}}},       # randint takes integers
])
def test_the_schema_rejects_what_the_validator_rejects(raw: dict, validator: jsonschema.Draft202012Validator):
    with pytest.raises(ConfigError):
        validate(raw)
    assert list(validator.iter_errors(raw)), f"the schema accepts {raw}"


@pytest.mark.parametrize("raw", [
    {},
    {"model": {"conv_dropout": [0.1, 0.2, 0.3]}, "train": {"patience": None, "lr": 0.01}},
    {"search": {"algo": "grid", "space": {"model.dropout_placement": {"choice": ["early", "late"]}}}},
    {"search": {"space": {"train.lr": {"loguniform": [1.0e-4, 1.0e-2]}, "model.units1": {"randint": [8, 64]},
                          "model.dense1_dropout": {"quniform": [0.0, 0.5, 0.05]}}}},
])
def test_the_schema_accepts_what_the_validator_accepts(raw: dict, validator: jsonschema.Draft202012Validator):
    validate(raw)
    assert [e.message for e in validator.iter_errors(raw)] == []


def test_every_key_carries_its_default_and_help_text():
    schema = spec_schema()
    docs = field_docs()
    defaults = flatten(to_dict(validate({})))
    for key, doc in docs.items():
        node = schema
        for part in key.split("."):
            node = node["properties"][part]
        assert (node["description"], node["default"]) == (doc, defaults[key]), key
    assert json.loads(json.dumps(schema)) == schema  # plain JSON, nothing Python-only


def test_the_schema_module_needs_no_mlflow():
    code = "import sys, fmnist_hpo.config.schema; sys.exit('mlflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
