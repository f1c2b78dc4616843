"""Whether a spec's models can train in this machine's memory, known before the first trial starts.

The validator bounds every key on its own; together they admit models (6 blocks of 4096 filters) that
need more memory than a laptop has. The need is computed on the meta device, which allocates nothing:
the parameters five times over (weights, gradients, Adam's two moments, the kept epoch's copy) and one
training batch's activations twice (kept for the backward pass, and their gradients). That is a lower
bound, so a spec refused here could not have trained; one that passes may still be tight.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from fmnist_hpo.config.loading import apply_overrides, to_dict
from fmnist_hpo.config.sections import validate
from fmnist_hpo.config.space import parse_entry, probe_values
from fmnist_hpo.errors import ConfigError, DeviceError

if TYPE_CHECKING:
    from fmnist_hpo.config.sections import Config

SIZE_KEYS = ("model.", "train.batch_size")


def training_bytes(cfg: Config) -> tuple[int, int]:
    """(a lower bound of the bytes training cfg's model takes, its parameter count)."""
    from fmnist_hpo.data.datasets import dataset_named
    from fmnist_hpo.training.model import build_model

    activations = 0

    def count(module: torch.nn.Module, inputs: object, output: object) -> None:
        nonlocal activations
        if isinstance(output, torch.Tensor):
            activations += output.numel()

    info = dataset_named(cfg.data.dataset)
    with torch.device("meta"):
        model = build_model(cfg.model, info)
        hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
        model.train()(torch.zeros(cfg.train.batch_size, info.channels, *info.image_shape))
    for hook in hooks:
        hook.remove()
    parameters = sum(p.numel() for p in model.parameters())
    return 4 * (5 * parameters + 2 * activations), parameters


def largest_variants(cfg: Config) -> list[Config]:
    """The spec, and each searched size key at each edge of its range (one key at a time)."""
    variants = [cfg]
    base = to_dict(cfg)
    for key, spec in cfg.search.space.items():
        if not key.startswith(SIZE_KEYS):
            continue
        for value in probe_values(*parse_entry(key, spec)):
            try:
                variants.append(validate(apply_overrides(base, {key: value})))
            except ConfigError:
                continue
    return variants


def available_bytes(device: torch.device) -> int | None:
    """Memory free for a new trial on device; None where it cannot be told (MPS, a non-Linux CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def check_fits(cfg: Config, device: torch.device) -> None:
    """Raise DeviceError when the spec's largest model cannot train in the memory device has free."""
    free = available_bytes(device)
    if free is None:
        return
    need, parameters, batch = max((*training_bytes(v), v.train.batch_size) for v in largest_variants(cfg))
    if need > free:
        raise DeviceError(f"the model ({parameters / 1e6:.0f}M parameters at batch size {batch}) needs at least "
                          f"{need / 2**30:.1f} GB to train, and {device.type} has {free / 2**30:.1f} GB free; make it "
                          "smaller (model.filters, model.num_blocks, model.units1, train.batch_size)")
