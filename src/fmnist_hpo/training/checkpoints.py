"""Checkpoints: a state_dict plus the model config and the dataset, written atomically, read without pickle code.

A checkpoint holds only tensors, strings, numbers, lists and dicts, so `torch.load(path,
weights_only=True)` reads it and a file that tries to run code on load is refused.
"""

from __future__ import annotations

import errno
import functools
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fmnist_hpo.data.datasets import UNNAMED, DatasetInfo, dataset_named
from fmnist_hpo.errors import DataError, FmnistError, first_line
from fmnist_hpo.files import atomic_write

FORMAT_VERSION = 1


class CheckpointError(FmnistError):
    """A checkpoint is missing, corrupt or not one of ours."""


def torch_save(obj: Any, path: Path) -> None:
    """torch.save, with a failed write raised as the OSError it is (ENOSPC on a full disk).

    torch's zip writer reports any failed write as "[enforce fail at inline_container.cc] unexpected pos",
    and even swallows the OSError of a Python file object; the free space then says what happened.
    """
    try:
        torch.save(obj, path)
    except RuntimeError as exc:
        if "inline_container" not in str(exc) and "PytorchStreamWriter" not in str(exc):
            raise
        stats = os.statvfs(path.parent)
        if stats.f_bavail * stats.f_frsize < 4 * 2**20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc
        raise OSError(errno.EIO, f"write failed ({str(exc).strip()[:120]})", str(path)) from exc


def save_checkpoint(path: Path, model: nn.Module, model_config: dict[str, Any], info: DatasetInfo,
                    **extra: Any) -> Path:
    payload = {
        "format_version": FORMAT_VERSION,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_config": model_config,
        "dataset": info.name,
        "classes": list(info.classes),
        "normalization": {"mean": info.mean, "std": info.std},
        **extra,
    }
    atomic_write(path, lambda tmp: torch_save(payload, tmp))
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for code, RuntimeError/EOFError for corrupt zips
        raise CheckpointError(f"{path}: not a loadable checkpoint ({load_failure(exc)})") from None
    if not isinstance(payload, dict) or "state_dict" not in payload or "model_config" not in payload:
        raise CheckpointError(f"{path}: not an fmnist-hpo checkpoint (no state_dict/model_config)")
    return payload


def load_failure(exc: BaseException) -> str:
    """Why torch.load refused a file, in one line; never torch's advice to retry with weights_only=False,
    which would run whatever code the file holds."""
    text = str(exc).strip()
    if "unsupported global" in text.lower():  # a function or class the safe unpickler refuses to import
        return "it holds objects other than tensors and plain values, which could run code when loaded; refused"
    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in text or "Weights only load failed" in text:
        return "damaged, or not a checkpoint: its bytes do not unpickle as tensors and plain values"
    return first_line(exc)


def trained_on(path: str | Path, payload: dict[str, Any]) -> DatasetInfo:
    """The dataset a checkpoint's model was trained on; one from before checkpoints named it: Fashion-MNIST."""
    name = payload.get("dataset", UNNAMED.name)
    try:
        return dataset_named(str(name))
    except DataError as exc:
        raise CheckpointError(f"{path}: trained on {exc}") from None


def load_model(path: str | Path) -> nn.Module:
    """The documented loader: a checkpoint file -> the trained model in eval mode, on the CPU."""
    return load_trained(path)[0]


def load_trained(path: str | Path) -> tuple[nn.Module, DatasetInfo]:
    """A checkpoint file -> (the trained model in eval mode on the CPU, the dataset it was trained on)."""
    from fmnist_hpo.config.sections import validate
    from fmnist_hpo.errors import ConfigError
    from fmnist_hpo.training.model import build_model

    payload = read_checkpoint(path)
    info = trained_on(path, payload)
    try:
        model_cfg = validate({"model": payload["model_config"]}).model
    except ConfigError as exc:
        raise CheckpointError(f"{path}: its model config is invalid ({exc})") from None
    build = functools.partial(build_model, model_cfg, info)
    _check_shapes(path, build, payload["state_dict"])  # before allocating what the config declares
    model = build()
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit its model config ({str(exc)[:200]})") from None
    return model.eval(), info


def _check_shapes(path: Path, build: Callable[[], nn.Module], weights: Any) -> None:
    """The weights fit the model the config declares, checked on the meta device (which allocates nothing),
    so a tiny file declaring a huge model costs nothing."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build().state_dict().items()}
    given = {k: tuple(v.shape) for k, v in weights.items() if isinstance(v, torch.Tensor)} \
        if isinstance(weights, dict) else {}
    if given != expected:
        wrong = sorted(k for k in expected if given.get(k) != expected[k])
        raise CheckpointError(f"{path}: weights do not fit its model config ({len(wrong)} of {len(expected)} tensors "
                              f"missing or of another shape, e.g. {wrong[0] if wrong else 'an extra one'})")


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    """The per-epoch state of a running trial (see train.training_state), replaced atomically."""
    atomic_write(path, lambda tmp: torch_save(state, tmp))


def read_training_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: corrupt training state ({load_failure(exc)}); "
                              "move it away to restart that trial from scratch") from None
    if not isinstance(state, dict) or "next_epoch" not in state:
        raise CheckpointError(f"{path}: not an fmnist-hpo training state")
    return state
