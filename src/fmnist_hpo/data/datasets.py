"""The datasets a study can train on, each described once: Fashion-MNIST, MNIST and KMNIST.

All three are 28x28 grey images in ten classes, stored as the same four IDX files and downloaded by
torchvision (whose class for each also names the folder it downloads into); what differs is here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fmnist_hpo.errors import DataError

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class DatasetInfo:
    name: str  # what data.dataset and a checkpoint call it
    title: str  # what messages call it
    torchvision_class: str  # in torchvision.datasets: downloads it into <root>/<torchvision_class>/raw
    classes: tuple[str, ...]
    mean: float  # of the training pixels, scaled to [0, 1]
    std: float
    image_size: int = 28
    channels: int = 1
    train_images: int = 60_000
    test_images: int = 10_000
    files: Mapping[str, str] = field(default_factory=lambda: FILES)

    @property
    def image_shape(self) -> tuple[int, int]:
        return self.image_size, self.image_size

    @property
    def black(self) -> float:
        """A pixel of 0 after normalisation: the background of all three datasets."""
        return -self.mean / self.std


FASHION_MNIST = DatasetInfo(
    "fashion-mnist", "Fashion-MNIST", "FashionMNIST",
    ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    mean=0.2860, std=0.3530,
)
MNIST = DatasetInfo("mnist", "MNIST", "MNIST", tuple("0123456789"), mean=0.1307, std=0.3081)
KMNIST = DatasetInfo("kmnist", "KMNIST", "KMNIST", ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
                     mean=0.1918, std=0.3483)

DATASETS = {info.name: info for info in (FASHION_MNIST, MNIST, KMNIST)}
UNNAMED = FASHION_MNIST  # what a checkpoint written before datasets had names was trained on


def dataset_named(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; one of {', '.join(DATASETS)}") from None
