"""How many trials share one GPU: `search.parallel: auto`.

One small CNN leaves most of an H100/H200 idle, so several trials (separate processes, Ray Tune's
fractional GPUs) run at once. How many is set by memory: free GPU memory over what one trial
takes, measured by running one training step and one evaluation step of the largest searched model
at its batch sizes (the memory the allocator then holds, CUDA graph pools included), plus its copy
of the data and what every process pays before it allocates anything (its CUDA context, measured
in this process). Nothing is measured where the sweep runs one trial at a time anyway.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

import torch

from fmnist_hpo.config.loading import apply_overrides, to_dict
from fmnist_hpo.config.sections import sequential_only, validate
from fmnist_hpo.config.space import grid_points, parse_entry, planned_points, probe_values, space_size
from fmnist_hpo.data.datasets import dataset_named
from fmnist_hpo.data.loading import Dataset
from fmnist_hpo.data.splits import noise_split
from fmnist_hpo.training.loop import evaluate, make_optimizer, prepare_trial, train_epoch

if TYPE_CHECKING:
    from fmnist_hpo.config.sections import Config

CUDA_CONTEXT_BYTES = 600 * 2**20  # a process's CUDA context and cuDNN/cuBLAS handles, where it cannot be measured
MAX_CONTEXT_BYTES = 4 * 2**30  # more than this "outside the allocator" is other processes, not our context
MEMORY_HEADROOM = 0.85  # fraction of free memory handed out: fragmentation and other processes' growth
MAX_TRIALS_PER_GPU = 8  # beyond this the GPU's compute, not its memory, is the limit
INSTALL_RAY = "pip install 'fmnist-hpo[ray]'"


SPEED_KEYS = ("model.", "train.batch_size", "train.eval_batch_size", "train.precision", "train.channels_last",
              "train.compile")
MAX_PROBED_VARIANTS = 6


def speed_variants(cfg: Config) -> list[Config]:
    """The configurations whose speed stands for the sweep: each combination of the searched keys that
    change speed, when they are few and finite; else the base configuration."""
    searched = {k: v for k, v in cfg.search.space.items() if k.startswith(SPEED_KEYS)}
    size = space_size(searched)
    if not searched or size is None or size > MAX_PROBED_VARIANTS:
        return [cfg]
    base = to_dict(cfg)
    return [validate(apply_overrides(base, point)) for point in grid_points(searched)]


def footprint_variants(cfg: Config) -> list[Config]:
    """The configurations whose memory stands for the sweep's largest trial: every combination of the
    searched keys that change speed when they are few (speed_variants), else each searched number at
    the top of its range with every combination of the other searched values, at most MAX_PROBED_VARIANTS."""
    variants = speed_variants(cfg)
    searched = {k: v for k, v in cfg.search.space.items() if k.startswith(SPEED_KEYS)}
    if len(variants) > 1 or not searched:
        return variants
    corner: dict[str, dict] = {}
    for key, spec in searched.items():
        kind, args = parse_entry(key, spec)
        values = probe_values(kind, args)
        numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        corner[key] = {"choice": [max(numbers)] if len(numbers) == len(values) else values}
    base = to_dict(cfg)
    points = grid_points(corner)[:MAX_PROBED_VARIANTS]
    return [validate(apply_overrides(base, point)) for point in points]


def ray_installed() -> bool:
    return importlib.util.find_spec("ray") is not None


def resolve_parallel(setting: int | str, device: torch.device | str, footprint_bytes: int | None = None,
                     free_bytes: int | None = None, ray_available: bool | None = None,
                     sequential_reason: str | None = None, gpu_count: int = 1,
                     cpu_count: int | None = None) -> tuple[int, str | None]:
    """(trials at once, a one-line note for the user or None) for search.parallel.

    setting: an int (returned as it is) or "auto". On CUDA, auto packs as many trials per GPU as
    free_bytes holds footprint_bytes (see trial_footprint), at most MAX_TRIALS_PER_GPU each and one
    CPU core per trial; on CPU or MPS it is 1. sequential_reason (sequential_only) forces 1.
    ray_available: None looks for the ray package.
    """
    if setting != "auto":
        return int(setting), None
    if sequential_reason is not None:
        return 1, f"search.parallel auto: one trial at a time ({sequential_reason})"
    if torch.device(device).type != "cuda":
        return 1, None
    if ray_available is None:
        ray_available = ray_installed()
    if not ray_available:
        return 1, f"search.parallel auto: one trial at a time; {INSTALL_RAY} to run several on this GPU"
    if footprint_bytes is None or free_bytes is None or footprint_bytes <= 0:
        return 1, "search.parallel auto: one trial at a time (a trial's GPU memory could not be measured)"
    per_gpu = min(MAX_TRIALS_PER_GPU, int(free_bytes * MEMORY_HEADROOM // footprint_bytes))
    trials = min(max(1, per_gpu) * gpu_count, cpu_count or os.cpu_count() or 1)
    return max(1, trials), (f"search.parallel auto: {max(1, trials)} trials at once "
                            f"({footprint_bytes / 2**30:.2f} GiB each, {free_bytes / 2**30:.1f} GiB free "
                            f"on each of {gpu_count} GPU{'s' if gpu_count > 1 else ''})")


def parallel_for(cfg: Config, device: torch.device, dataset: Dataset) -> tuple[int, str | None]:
    """cfg.search.parallel as a number for this machine, and the note to show; the sweep driver's
    entry point. A trial is measured only when auto could pick more than one."""
    setting, reason = cfg.search.parallel, sequential_only(cfg.search)
    if setting != "auto" or reason is not None or device.type != "cuda" or not ray_installed():
        return resolve_parallel(setting, device, sequential_reason=reason)
    if planned_points(cfg.search.space, cfg.search.algo, cfg.search.max_evals) <= 1:
        return 1, None  # one trial: nothing to share the GPU with
    footprint = max(trial_footprint(variant, device, dataset) for variant in footprint_variants(cfg))
    return resolve_parallel(setting, device, footprint, free_gpu_bytes(device),
                            ray_available=True, gpu_count=torch.cuda.device_count())


def step_peak_bytes(cfg: Config, device: torch.device) -> int:
    """CUDA memory cfg's trial holds at its peak: one training step and one evaluation step of its model.

    The steps run on random images at cfg.train.batch_size and cfg.train.eval_batch_size, with
    the trial's engine (precision, channels_last, CUDA graphs), so optimizer state, activations and
    both graphs' private pools (which keep their high-water mark while they live, and live together)
    are counted. Counted as the allocator's reserved memory, which is what other processes cannot
    have; it is returned to the device afterwards.
    """
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_reserved(device)
    batch = max(cfg.train.batch_size, cfg.train.eval_batch_size)
    generator = torch.Generator(device=device).manual_seed(0)
    data = noise_split(batch, dataset_named(cfg.data.dataset), device, generator)
    train = data.first(cfg.train.batch_size)
    model, engine = prepare_trial(cfg, device)
    try:
        train_epoch(model, train, make_optimizer(model, cfg.train, engine), engine, cfg.train, cfg.data)
        evaluate(model, data, engine, cfg.train.eval_batch_size)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_reserved(device) - before
    finally:
        engine.release_graphs()
    del model, engine, data, train
    torch.cuda.empty_cache()
    return peak


def context_bytes(device: torch.device) -> int:
    """This process's CUDA memory outside the allocator (context, cuDNN and cuBLAS handles): the device's
    used memory less what the allocator reserved; other processes on the device would count too, so
    beyond MAX_CONTEXT_BYTES the fixed CUDA_CONTEXT_BYTES stands in."""
    free, total = torch.cuda.mem_get_info(device)
    outside = total - free - torch.cuda.memory_reserved(device)
    return int(outside) if 0 < outside <= MAX_CONTEXT_BYTES else CUDA_CONTEXT_BYTES


def trial_footprint(cfg: Config, device: torch.device, dataset: Dataset) -> int:
    """What one more trial process takes from the GPU: its steps, its copy of the data, its context."""
    data_bytes = sum(a.nbytes for a in (dataset.train_images, dataset.train_labels,
                                        dataset.test_images, dataset.test_labels))
    return step_peak_bytes(cfg, device) + data_bytes + context_bytes(device)


def free_gpu_bytes(device: torch.device) -> int:
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)
