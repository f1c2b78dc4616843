"""The dataset seam: Fashion-MNIST, MNIST and KMNIST, each described once and asked by everything that needs it."""

from __future__ import annotations

import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_dataset, write_idx
from typer.testing import CliRunner

from fmnist_hpo.cli.app import app
from fmnist_hpo.config.loading import to_dict
from fmnist_hpo.config.sections import DataConfig, validate
from fmnist_hpo.data.datasets import DATASETS, FASHION_MNIST, KMNIST, MNIST, dataset_named
from fmnist_hpo.data.lineage import idx_digest
from fmnist_hpo.data.loading import find_files, load_dataset
from fmnist_hpo.data.splits import SplitCache
from fmnist_hpo.errors import ConfigError, DataError
from fmnist_hpo.training.batches import augment, normalize
from fmnist_hpo.training.checkpoints import CheckpointError, load_trained, read_checkpoint, save_checkpoint
from fmnist_hpo.training.model import build_model

runner = CliRunner()
TINY_MODEL = {"num_blocks": 1, "filters": 4, "units1": 8, "units2": 8}


def torchvision_folder(root: Path, name: str, n_train: int = 40, n_test: int = 20) -> Path:
    """Synthetic IDX files of dataset name where torchvision's download puts them: root/<its class>/raw."""
    write_dataset(root / dataset_named(name).torchvision_class / "raw", n_train, n_test)
    return root


def data_config(root: Path, name: str) -> DataConfig:
    return validate({"data": {"root": str(root), "download": False, "dataset": name, "val_size": 10}}).data


def checkpoint_of(path: Path, info) -> Path:
    cfg = validate({"model": TINY_MODEL})
    torch.manual_seed(0)
    return save_checkpoint(path, build_model(cfg.model, info), to_dict(cfg)["model"], info)


def test_the_config_offers_exactly_the_described_datasets():
    assert typing.get_args(typing.get_type_hints(DataConfig)["dataset"]) == tuple(DATASETS)
    assert validate({}).data.dataset == "fashion-mnist"
    with pytest.raises(ConfigError, match=r"data\.dataset"):
        validate({"data": {"dataset": "cifar10"}})
    with pytest.raises(DataError, match="unknown dataset 'cifar10'; one of fashion-mnist, mnist, kmnist"):
        dataset_named("cifar10")


@pytest.mark.parametrize("name", list(DATASETS))
def test_each_dataset_loads_from_where_torchvision_puts_it(tmp_path: Path, name: str):
    root = torchvision_folder(tmp_path, name)
    dataset = load_dataset(data_config(root, name))
    assert dataset.train_images.shape == (40, 28, 28) and dataset.test_labels.shape == (20,)
    assert len(idx_digest(root, dataset_named(name))) == 32


def test_one_datasets_folder_is_not_taken_for_anothers(tmp_path: Path):
    root = torchvision_folder(tmp_path, "mnist")
    assert find_files(root, MNIST) is not None and find_files(root, KMNIST) is None
    with pytest.raises(DataError, match=r"^KMNIST is not in .*t10k-labels-idx1-ubyte"):
        load_dataset(data_config(root, "kmnist"))


@pytest.mark.parametrize("info", [FASHION_MNIST, MNIST, KMNIST], ids=lambda i: i.name)
def test_batches_are_normalised_with_their_datasets_mean_and_std(info):
    pixels = torch.tensor([0, 255], dtype=torch.uint8)
    assert normalize(pixels, info).tolist() == pytest.approx([-info.mean / info.std, (1 - info.mean) / info.std])
    cfg = validate({"data": {"augment_translate": 4}}).data
    moved = augment(normalize(torch.full((8, 1, 28, 28), 255, dtype=torch.uint8), info), cfg,
                    torch.Generator().manual_seed(0), info)
    assert moved.min().item() == pytest.approx(info.black)  # what translation brings in is that dataset's black


def test_a_checkpoint_records_its_dataset_and_an_older_one_reads_as_fashion_mnist(tmp_path: Path):
    path = checkpoint_of(tmp_path / "k.pt", KMNIST)
    payload = read_checkpoint(path)
    assert payload["dataset"] == "kmnist" and payload["classes"] == list(KMNIST.classes)
    assert payload["normalization"] == {"mean": KMNIST.mean, "std": KMNIST.std}
    assert load_trained(path)[1] is KMNIST
    del payload["dataset"]  # as every checkpoint written before datasets had names
    torch.save(payload, tmp_path / "old.pt")
    assert load_trained(tmp_path / "old.pt")[1] is FASHION_MNIST
    payload["dataset"] = "emnist"
    torch.save(payload, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=r"odd\.pt: trained on unknown dataset 'emnist'"):
        load_trained(tmp_path / "odd.pt")


def test_evaluate_scores_a_checkpoint_on_its_own_dataset_and_names_it_for_another(tmp_path: Path):
    root = torchvision_folder(tmp_path / "data", "mnist")
    checkpoint = checkpoint_of(tmp_path / "digits.pt", MNIST)
    own = runner.invoke(app, ["evaluate", str(checkpoint), "--data-root", str(root), "--png", str(tmp_path / "cm.png")])
    assert own.exit_code == 0, own.stderr
    rows = own.stdout.split("columns: predicted class)\n")[1].splitlines()
    assert rows[0].split() == list("0123456789") and [row.split()[0] for row in rows[1:11]] == list("0123456789")
    other = runner.invoke(app, ["evaluate", str(checkpoint), "--dataset", "fashion-mnist", "--data-root", str(root)])
    assert other.exit_code == 2 and other.stderr.count("\n") == 1
    assert "the checkpoint was trained on MNIST, not Fashion-MNIST; leave --dataset out or pass --dataset mnist" \
        in other.stderr


def test_predict_speaks_the_checkpoints_classes_and_refuses_another_dataset(tmp_path: Path):
    root = torchvision_folder(tmp_path / "data", "kmnist", n_test=5)
    checkpoint = checkpoint_of(tmp_path / "kana.pt", KMNIST)
    images = next((root / "KMNIST" / "raw").glob("t10k-images*"))
    result = runner.invoke(app, ["predict", str(checkpoint), "--idx", str(images), "--limit", "0"])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 6 and lines[-1].startswith("accuracy ")  # five images, then the accuracy on their labels
    assert {line.split(": ")[1].split()[0] for line in lines[:5]} <= set(KMNIST.classes)
    other = runner.invoke(app, ["predict", str(checkpoint), "--idx", str(images), "--dataset", "mnist"])
    assert other.exit_code == 2 and other.stderr.count("\n") == 1
    assert "trained on KMNIST, not MNIST" in other.stderr


def test_a_trained_dataset_keeps_its_label_range(tmp_path: Path):
    root = tmp_path / "data"
    torchvision_folder(root, "mnist")
    labels = next((root / "MNIST" / "raw").glob("train-labels*"))
    labels.unlink()
    write_idx(labels.with_name("train-labels-idx1-ubyte"), np.full(40, 10, dtype=np.uint8))
    with pytest.raises(DataError, match=r"label 10 is not a class of MNIST \(0-9\)"):
        load_dataset(data_config(root, "mnist"))


def test_a_trial_of_another_dataset_gets_no_splits_of_this_one(tmp_path: Path):
    root = torchvision_folder(tmp_path, "mnist")
    cache = SplitCache(load_dataset(data_config(root, "mnist")), torch.device("cpu"))
    assert len(cache.get(data_config(root, "mnist")).val) == 10
    with pytest.raises(DataError, match=r"data\.dataset: kmnist in a sweep of mnist"):
        cache.get(data_config(root, "kmnist"))


def test_a_search_cannot_vary_the_dataset():
    with pytest.raises(ConfigError, match=r"a search cannot vary data\.dataset"):
        validate({"search": {"space": {"data.dataset": {"choice": ["mnist", "kmnist"]}}}})
