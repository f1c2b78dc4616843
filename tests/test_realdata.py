"""Trains on the real Fashion-MNIST for a few seconds; runs only where FMNIST_DATA_DIR is set."""

import os
from pathlib import Path

import pytest
import torch

from fmnist_hpo.config.sections import validate
from fmnist_hpo.data.loading import load_dataset
from fmnist_hpo.data.splits import make_splits
from fmnist_hpo.training.loop import train_and_test

DATA_DIR = os.environ.get("FMNIST_DATA_DIR")
pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not DATA_DIR or not Path(DATA_DIR).is_dir(), reason="set FMNIST_DATA_DIR to the IDX files"),
]


def test_real_data_has_the_standard_shape():
    ds = load_dataset(validate({"data": {"download": False}}).data)
    assert ds.train_images.shape == (60_000, 28, 28) and ds.test_images.shape == (10_000, 28, 28)
    assert torch.bincount(torch.from_numpy(ds.test_labels)).tolist() == [1000] * 10
    assert abs(ds.train_images.mean() / 255 - 0.2860) < 1e-3


def test_a_few_seconds_of_training_beats_70_percent():
    cfg = validate({
        "data": {"download": False, "train_subset": 5000, "val_size": 2000},
        "model": {"num_blocks": 3, "filters": 16, "units1": 64, "units2": 32, "conv_dropout": 0.0},
        "train": {"epochs": 2, "batch_size": 64, "lr": 4e-3, "scheduler": "onecycle", "device": "cpu",
                  "eval_batch_size": 256},
    })
    device = torch.device("cpu")
    outcome = train_and_test(cfg, make_splits(load_dataset(cfg.data), cfg.data, device), device)
    assert outcome.test_accuracy > 0.70


def test_a_real_data_sweep_leaves_a_store_to_verify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A tiny sweep with its best model logged; .ci/run then runs `fmnist verify` on its store.

    FMNIST_REALDATA_STORE names the folder to keep it in (else a temporary one).
    """
    import yaml
    from typer.testing import CliRunner

    from fmnist_hpo.cli.app import app

    folder = Path(os.environ.get("FMNIST_REALDATA_STORE") or tmp_path).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(folder)  # a SQLite store's artifacts go to ./mlruns
    spec = {
        "experiment": "realdata", "models_dir": str(folder / "models"),
        "data": {"download": False, "train_subset": 2000, "val_size": 1000},
        "model": {"num_blocks": 2, "filters": 8, "units1": 32, "units2": 16},
        "train": {"epochs": 2, "batch_size": 64, "lr": 3e-3, "scheduler": "none", "device": "cpu"},
        "search": {"max_evals": 2, "space": {"model.filters": {"choice": [8, 16]}}},
        "mlflow": {"log_model": "best", "tracking_uri": f"sqlite:///{folder / 'mlflow.db'}"},
    }
    (folder / "realdata.yaml").write_text(yaml.safe_dump(spec))
    runner = CliRunner()
    done = runner.invoke(app, ["run", "realdata.yaml", "--quiet", "--fresh"])
    assert done.exit_code == 0, done.output + done.stderr
    assert len(list((folder / "models" / "realdata").glob("*.pt"))) == 2
