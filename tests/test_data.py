import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import N_TEST, N_TRAIN, write_dataset, write_idx

from fmnist_hpo.config.sections import validate
from fmnist_hpo.data.datasets import FILES
from fmnist_hpo.data.idx import read_idx
from fmnist_hpo.data.loading import load_dataset
from fmnist_hpo.data.splits import balanced_subset, make_splits, stratified_split
from fmnist_hpo.errors import DataError


def data_cfg(root: Path, **values):
    return validate({"data": {"root": str(root), "download": False, "val_size": 100, **values}}).data


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path: Path, compress: bool):
    array = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    path = write_idx(tmp_path / "x-idx3-ubyte", array, compress)
    assert np.array_equal(read_idx(path), array)


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"\x00\x00\x0d\x01" + b"\x00\x00\x00\x02" + b"ab", "bad magic number"),
        (b"\x00\x00\x08\x03\x00\x00", "header is truncated"),
        (b"\x00\x00\x08\x01" + b"\x00\x00\x00\x05" + b"abc", "truncated: header promises 5 bytes of data, file has 3"),
        (b"\x00\x00\x08\x01" + b"\x00\x00\x00\x02" + b"abcd", "2 unexpected bytes after the data"),
    ],
)
def test_read_idx_rejects_corrupt_files(tmp_path: Path, blob: bytes, message: str):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(blob)
    with pytest.raises(DataError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_rejects_a_broken_gzip(tmp_path: Path):
    path = tmp_path / "bad-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x09" + b"x" * 9)[:-6])
    with pytest.raises(DataError, match="cannot be read"):
        read_idx(path)


def test_load_dataset_reads_plain_and_gzipped(tmp_path: Path, data_dir: Path):
    ds = load_dataset(data_cfg(data_dir))
    assert ds.train_images.shape == (N_TRAIN, 28, 28) and ds.train_images.dtype == np.uint8
    assert ds.test_labels.shape == (N_TEST,) and ds.test_labels.dtype == np.int64
    plain = write_dataset(tmp_path / "plain", compress=False)
    assert np.array_equal(load_dataset(data_cfg(plain)).train_images, ds.train_images)


def test_missing_files_name_all_four_and_the_folder(tmp_path: Path):
    with pytest.raises(DataError) as info:
        load_dataset(data_cfg(tmp_path))
    message = str(info.value)
    assert str(tmp_path) in message
    assert all(name in message for name in FILES.values())


def test_label_count_mismatch_names_the_file(tmp_path: Path):
    root = write_dataset(tmp_path / "d")
    write_idx(root / FILES["train_labels"], np.zeros(N_TRAIN - 1, dtype=np.uint8))
    with pytest.raises(DataError, match=f"{N_TRAIN - 1} labels for {N_TRAIN} images"):
        load_dataset(data_cfg(root))


def test_labels_outside_the_ten_classes(tmp_path: Path):
    root = write_dataset(tmp_path / "d")
    write_idx(root / FILES["test_labels"], np.full(N_TEST, 12, dtype=np.uint8))
    with pytest.raises(DataError, match="label 12 is not a class"):
        load_dataset(data_cfg(root))


def test_stratified_split_is_seeded_disjoint_and_proportional():
    labels = np.repeat(np.arange(10), [100, 100, 100, 100, 100, 100, 100, 100, 100, 50])
    train, val = stratified_split(labels, 95, seed=3)
    assert len(val) == 95 and len(train) == len(labels) - 95
    assert not set(train) & set(val)
    counts = np.bincount(labels[val], minlength=10)
    assert counts.tolist() == [10] * 9 + [5]
    assert np.array_equal(val, stratified_split(labels, 95, seed=3)[1])
    assert not np.array_equal(val, stratified_split(labels, 95, seed=4)[1])


def test_val_size_larger_than_the_data_is_an_error():
    with pytest.raises(DataError, match=r"data\.val_size"):
        stratified_split(np.arange(20) % 10, 20, seed=0)


def test_balanced_subset_takes_the_first_images_of_each_class():
    labels = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    picked = balanced_subset(np.arange(8), labels, 4)
    assert picked.tolist() == [0, 1, 3, 4]


def test_splits_live_on_the_device_as_uint8(data_dir: Path):
    cfg = data_cfg(data_dir, train_subset=50)
    splits = make_splits(load_dataset(cfg), cfg, torch.device("cpu"))
    assert splits.train.images.shape == (50, 1, 28, 28) and splits.train.images.dtype == torch.uint8
    assert len(splits.val) == 100 and len(splits.test) == N_TEST
    assert torch.bincount(splits.train.labels, minlength=10).tolist() == [5] * 10
