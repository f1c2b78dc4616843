"""Batches on the training device: shuffled index batches, normalised and augmented where they are."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch

    from fmnist_hpo.config.sections import DataConfig
    from fmnist_hpo.data.datasets import DatasetInfo


def normalize(images: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """uint8 pixels -> float32 standardised by info's mean and std, on whatever device the batch is."""
    return images.float().mul_(1.0 / (255.0 * info.std)).sub_(info.mean / info.std)


def augment(x: torch.Tensor, cfg: DataConfig, generator: torch.Generator, info: DatasetInfo) -> torch.Tensor:
    """Flip, translate and erase a normalised batch, each image independently, on its device.

    Translation brings in black background; erased patches take the mean pixel (0 once normalised),
    as torchvision's RandomErasing does.
    """
    import torch
    import torch.nn.functional as F

    n, _, h, w = x.shape
    dev = x.device
    if cfg.augment_flip:
        flip = torch.rand(n, device=dev, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if cfg.augment_translate:
        t = cfg.augment_translate
        padded = F.pad(x, (t, t, t, t), value=info.black)
        dy, dx = (torch.randint(0, 2 * t + 1, (2, n), device=dev, generator=generator))
        rows = (torch.arange(h, device=dev)[None, :] + dy[:, None])[:, None, :, None].expand(n, 1, h, w + 2 * t)
        cols = (torch.arange(w, device=dev)[None, :] + dx[:, None])[:, None, None, :].expand(n, 1, h, w)
        x = padded.gather(2, rows).gather(3, cols)
    if cfg.augment_erase:
        erase = torch.rand(n, device=dev, generator=generator) < cfg.augment_erase
        size = torch.randint(4, h // 2 + 1, (2, n), device=dev, generator=generator)
        top = (torch.rand(n, device=dev, generator=generator) * (h - size[0])).long()
        left = (torch.rand(n, device=dev, generator=generator) * (w - size[1])).long()
        r = torch.arange(h, device=dev)[None, :]
        c = torch.arange(w, device=dev)[None, :]
        in_rows = (r >= top[:, None]) & (r < (top + size[0])[:, None])
        in_cols = (c >= left[:, None]) & (c < (left + size[1])[:, None])
        mask = (in_rows[:, :, None] & in_cols[:, None, :] & erase[:, None, None])[:, None]
        x = x.masked_fill(mask, 0.0)
    return x


def steps_per_epoch(n: int, batch_size: int) -> int:
    """How many batches `batches` yields for n images: a last batch of one image is dropped."""
    full, rest = divmod(n, batch_size)
    return max(1, full + (rest > 1))


def batches(n: int, batch_size: int, generator: torch.Generator, device: torch.device) -> Iterator[torch.Tensor]:
    """Index tensors of a shuffled epoch; a last batch of one image is dropped (BatchNorm needs two)."""
    import torch

    order = torch.randperm(n, device=device, generator=generator)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        if idx.numel() > 1:
            yield idx
