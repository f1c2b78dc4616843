"""preflight(): validate and --dry-run fail where a run would fail at once, and show what a run would use."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_raw
from typer.testing import CliRunner

from fmnist_hpo.cli.app import app
from fmnist_hpo.config.loading import load
from fmnist_hpo.config.sections import validate
from fmnist_hpo.errors import DataError, DeviceError, OutputError
from fmnist_hpo.search.preflight import preflight
from fmnist_hpo.tracking.store import TrackingError

runner = CliRunner()


def spec_in(folder: Path, raw: dict) -> Path:
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def test_resolves_what_a_run_uses(workdir: Path, data_dir: Path):
    resolved = preflight(validate(tiny_raw(data_dir, experiment="e1", models_dir="out")))
    from fmnist_hpo.training.device import cpu_has_native_bf16

    assert resolved.device == "cpu" and resolved.precision == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert resolved.data_root == data_dir and resolved.data_present
    assert resolved.tracking_uri == f"sqlite:///{workdir / 'mlflow.db'}"
    assert resolved.checkpoint_dir == workdir / "out" / "e1"
    assert not (workdir / "out").exists() and not (workdir / "mlflow.db").exists()  # checked, not created


def test_missing_data_is_an_error_only_without_download(workdir: Path):
    nowhere = workdir / "nowhere"
    with pytest.raises(DataError, match=r"Fashion-MNIST is not in .*nowhere"):
        preflight(validate(tiny_raw(nowhere)))
    resolved = preflight(validate(tiny_raw(nowhere, data={"download": True})))
    assert not resolved.data_present and "will be downloaded" in resolved.describe()[1]
    assert not nowhere.exists()


def test_unwritable_places_are_errors(workdir: Path, data_dir: Path):
    blocker = workdir / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match=r"cannot create the checkpoint folder .*a-file is a file"):
        preflight(validate(tiny_raw(data_dir, models_dir=str(blocker / "models"))))
    with pytest.raises(DataError, match="cannot be downloaded there"):
        preflight(validate(tiny_raw(blocker / "data", data={"download": True})))
    with pytest.raises(TrackingError, match="cannot create the MLflow store"):
        preflight(validate(tiny_raw(data_dir, mlflow={"tracking_uri": f"sqlite:///{blocker}/x.db"})))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_validate_and_dry_run_fail_like_the_run_without_cuda(workdir: Path, data_dir: Path):
    spec = spec_in(workdir, tiny_raw(data_dir))
    with pytest.raises(DeviceError):
        preflight(load(spec, ["train.device=cuda"]))
    for args in (["validate", str(spec), "--set", "train.device=cuda"], ["run", str(spec), "--device", "cuda", "--dry-run"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and result.stderr == (
            f"error: device 'cuda' is not available on this machine (torch {torch.__version__})\n")


def test_validate_fails_without_data_files(workdir: Path):
    result = runner.invoke(app, ["validate", str(spec_in(workdir, tiny_raw(workdir / "empty")))])
    assert result.exit_code == 2 and "Fashion-MNIST is not in" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_dry_run_prints_resolved_values_not_null(workdir: Path, data_dir: Path):
    raw = tiny_raw(data_dir)
    raw["data"]["root"] = None
    raw["train"]["device"] = "auto"
    result = runner.invoke(app, ["run", str(spec_in(workdir, raw)), "--dry-run"], env={"FMNIST_DATA_DIR": str(data_dir)})
    assert result.exit_code == 0, result.stderr
    shown = yaml.safe_load(result.output)
    assert shown["data"]["root"] == str(data_dir)
    assert shown["mlflow"]["tracking_uri"] == f"sqlite:///{workdir / 'mlflow.db'}"
    assert shown["train"]["device"] in ("cpu", "cuda", "mps") and shown["models_dir"] == str(workdir / "models")
    assert f"#   checkpoints: {workdir / 'models' / 'tiny'}" in result.output
    assert not (workdir / "mlflow.db").exists() and not (workdir / "models").exists()
