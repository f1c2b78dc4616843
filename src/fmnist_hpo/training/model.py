"""The study's BatchNorm CNN family, built from the model section of the config."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from fmnist_hpo.config.sections import ModelConfig
    from fmnist_hpo.data.datasets import DatasetInfo


def conv_dropout_rates(cfg: ModelConfig) -> list[float]:
    """The Dropout2d rate of each block after dropout_placement has picked which blocks get one."""
    n = cfg.num_blocks
    rates = cfg.conv_dropout if isinstance(cfg.conv_dropout, list) else [cfg.conv_dropout] * n
    chosen = {
        "all": range(n),
        "none": (),
        "early": (0,),
        "late": (n - 1,),
        "both": {0, n - 1},
        "middle": range(1, n - 1),
    }[cfg.dropout_placement]
    return [rate if i in chosen else 0.0 for i, rate in enumerate(rates)]


class ConvBlock(nn.Module):
    """conv -> BatchNorm -> ReLU (+ shortcut) -> MaxPool 2 -> Dropout2d."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, batchnorm: bool,
                 dropout: float, residual: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=not batchnorm)
        self.norm = nn.BatchNorm2d(out_channels) if batchnorm else nn.Identity()
        self.shortcut: nn.Module | None = None
        if residual:
            self.shortcut = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        # ceil_mode keeps a 1x1 map at 1x1, so any depth fits a 28x28 input
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.conv(x))
        if self.shortcut is not None:
            return self.dropout(self.pool(torch.relu(y) + self.shortcut(x)))
        # ReLU and max-pooling commute (both monotone), values and gradients alike: pooling first
        # leaves ReLU a quarter of the elements, the largest tensors of a step
        return self.dropout(torch.relu(self.pool(y)))


def _tower(cfg: ModelConfig, kernel_size: int, in_channels: int) -> nn.Sequential:
    blocks = []
    for i, rate in enumerate(conv_dropout_rates(cfg)):
        blocks.append(ConvBlock(
            in_channels=in_channels if i == 0 else cfg.filters,
            out_channels=cfg.filters,
            kernel_size=kernel_size,
            batchnorm=cfg.batchnorm,
            dropout=rate,
            residual=cfg.residual and i > 0,
        ))
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _dense(in_features: int, out_features: int, batchnorm: bool, dropout: float) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Linear(in_features, out_features, bias=not batchnorm)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(out_features))
    layers.append(nn.ReLU())
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return layers


class FashionCNN(nn.Module):
    """Conv tower(s) -> global average pool -> two dense layers -> a logit per class of the dataset."""

    def __init__(self, cfg: ModelConfig, info: DatasetInfo) -> None:
        super().__init__()
        kernels = (3, 5) if cfg.architecture == "dual_path" else (3,)
        self.towers = nn.ModuleList(_tower(cfg, k, info.channels) for k in kernels)
        features = cfg.filters * len(kernels)
        self.head = nn.Sequential(
            *_dense(features, cfg.units1, cfg.batchnorm, cfg.dense1_dropout),
            *_dense(cfg.units1, cfg.units2, cfg.batchnorm, cfg.dense2_dropout),
            nn.Linear(cfg.units2, len(info.classes)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [tower(x) for tower in self.towers]
        return self.head(features[0] if len(features) == 1 else torch.cat(features, dim=1))


def build_model(cfg: ModelConfig, info: DatasetInfo) -> FashionCNN:
    return FashionCNN(cfg, info)


def folded_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of model with each BatchNorm folded into the conv or linear layer before it: the same
    function to float rounding, one pass less over every activation. For evaluation only."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    with torch.no_grad():
        folded = copy.deepcopy(model).eval()
        for block in (m for m in folded.modules() if isinstance(m, ConvBlock)):
            if isinstance(block.norm, nn.BatchNorm2d):
                block.conv, block.norm = fuse_conv_bn_eval(block.conv, block.norm), nn.Identity()
        for layers in (m for m in folded.modules() if isinstance(m, nn.Sequential)):
            for i in range(len(layers) - 1):
                if isinstance(layers[i], nn.Linear) and isinstance(layers[i + 1], nn.BatchNorm1d):
                    layers[i], layers[i + 1] = fuse_linear_bn_eval(layers[i], layers[i + 1]), nn.Identity()
    return folded


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class NormalizedClassifier(nn.Module):
    """Takes images as floats in [0, 1] (what torchvision's ToTensor gives) and returns logits."""

    def __init__(self, model: nn.Module, info: DatasetInfo) -> None:
        super().__init__()
        self.model = model
        self.mean, self.std = info.mean, info.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def with_normalization(model: nn.Module, info: DatasetInfo) -> nn.Module:
    return NormalizedClassifier(model, info).eval()
