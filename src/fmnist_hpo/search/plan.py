"""Several specs as one plan: validated together before anything runs, timed before they start,
then run in order, each into its own experiment (a spec whose sweep finished before is skipped).

The estimate comes from a short probe: rounds of a few training steps and evaluation batches of each
distinct model (and batch size) on the chosen device, scaled to the planned trials, epochs and split
sizes, plus each trial's warm-up and fixed costs. It is rough (the machine's load moves it) and
counts every epoch: early stopping and pruning can only shorten a sweep.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fmnist_hpo.config.loading import hash_of, to_dict
from fmnist_hpo.config.sections import Config
from fmnist_hpo.config.space import planned_points
from fmnist_hpo.errors import FmnistError
from fmnist_hpo.files import models_folder
from fmnist_hpo.records import SpecOutcome, SpecStatus, SweepResult
from fmnist_hpo.search.packing import speed_variants
from fmnist_hpo.search.resume import Ask, ResumeMode

if TYPE_CHECKING:
    import torch

    from fmnist_hpo.search.preflight import Resolved

# fixed costs no probe of the model sees, measured on a busy 2-core CPU with an SQLite store: a trial's
# run opened, logged and closed with its checkpoint; a sweep's start-up (imports, reading the data,
# opening the store) and its selected model logged as an MLflow model
TRIAL_FIXED_SECONDS = 1.0
SWEEP_FIXED_SECONDS = 20.0
PROBE_ROUNDS = (3, 7)  # timed rounds of steps, at least and at most: their median is a step's cost
EVAL_PROBE_BATCHES = 4
PROBE_BUDGET_SECONDS = 1.5  # rounds stop once they took this long (after the minimum)


@dataclass(frozen=True)
class Probe:
    epoch_seconds: float  # training plus validation
    test_seconds: float  # one pass over the test set
    warmup_seconds: float  # what a trial's first step costs beyond a steady one (allocation, kernel choice)


@dataclass(frozen=True)
class Estimate:
    experiment: str
    runs: int  # trained configurations x repeats
    epochs: int  # at most, per run
    epoch_seconds: float  # training plus validation, from the probe
    run_seconds: float  # every epoch, the test pass, the warm-up and the run's fixed cost

    @property
    def fixed_seconds(self) -> float:
        """Per run: everything but its epochs."""
        return self.run_seconds - self.epochs * self.epoch_seconds

    @property
    def total_seconds(self) -> float:
        return self.runs * self.run_seconds + SWEEP_FIXED_SECONDS


def estimate(cfg: Config, device: torch.device, probe_cache: dict[str, Probe] | None = None,
             on_probe: Callable[[str], None] | None = None) -> Estimate:
    """on_probe(text) is told before each model is timed (the probe takes seconds per model)."""
    search = cfg.search
    runs = planned_points(search.space, search.algo, search.max_evals) * search.repeats
    cache = {} if probe_cache is None else probe_cache
    variants = speed_variants(cfg)
    probes = []
    for i, variant in enumerate(variants, start=1):
        if on_probe is not None and _probe_key(variant) not in cache:
            on_probe(f"timing {cfg.experiment}: model {i} of {len(variants)}")
        probes.append(probe_cached(variant, device, cache))
    epoch_seconds = statistics.fmean(p.epoch_seconds for p in probes)
    fixed = statistics.fmean(p.test_seconds + p.warmup_seconds for p in probes) + TRIAL_FIXED_SECONDS
    return Estimate(cfg.experiment, runs, cfg.train.epochs, epoch_seconds, epoch_seconds * cfg.train.epochs + fixed)


def _probe_key(cfg: Config) -> str:
    raw = to_dict(cfg)
    return hash_of({"model": raw["model"], "train": raw["train"], "data": raw["data"]})


def probe_cached(cfg: Config, device: torch.device, cache: dict[str, Probe]) -> Probe:
    key = _probe_key(cfg)
    if key not in cache:
        cache[key] = probe(cfg, device)
    return cache[key]


def probe(cfg: Config, device: torch.device, steps: int = 2) -> Probe:
    """The cost of cfg's model on device: rounds of a few timed steps and evaluation batches, each
    figure the median of its rounds, so one round slowed by a busy core does not set the estimate."""
    from fmnist_hpo.data.datasets import dataset_named
    from fmnist_hpo.data.splits import noise_split
    from fmnist_hpo.training.batches import steps_per_epoch
    from fmnist_hpo.training.loop import evaluate, make_optimizer, make_schedulers, prepare_trial, train_epoch

    model, engine = prepare_trial(cfg, device)
    optimizer = make_optimizer(model, cfg.train, engine)  # capturable under CUDA graphs, as a real run's
    _, step_scheduler = make_schedulers(optimizer, cfg.train, steps * PROBE_ROUNDS[1] + 1,
                                        cycle_momentum=not engine.cuda_graphs)

    batch, eval_batch = cfg.train.batch_size, cfg.train.eval_batch_size
    info = dataset_named(cfg.data.dataset)
    train_split = noise_split(batch * steps, info, device)
    # several batches a call, as a validation pass: evaluate() folds BatchNorm once per call on CPU
    eval_split = noise_split(eval_batch * EVAL_PROBE_BATCHES, info, device)
    first = _timed(lambda: train_epoch(model, noise_split(batch, info, device), optimizer, engine, cfg.train,
                                       cfg.data, step_scheduler))
    step = _median_seconds(lambda: train_epoch(model, train_split, optimizer, engine, cfg.train, cfg.data,
                                               step_scheduler)) / steps
    evaluate(model, eval_split, engine, eval_batch)
    eval_batch_seconds = _median_seconds(lambda: evaluate(model, eval_split, engine, eval_batch)) / EVAL_PROBE_BATCHES
    engine.release_graphs()  # a graph that failed here has already turned graphs off (auto) and trained eagerly
    train_images = cfg.data.train_subset or info.train_images - cfg.data.val_size
    epoch = steps_per_epoch(train_images, batch) * step + math.ceil(cfg.data.val_size / eval_batch) * eval_batch_seconds
    return Probe(epoch, math.ceil(info.test_images / eval_batch) * eval_batch_seconds, max(0.0, first - step))


def _median_seconds(fn) -> float:  # type: ignore[no-untyped-def]
    least, most = PROBE_ROUNDS
    rounds: list[float] = []
    while len(rounds) < least or (len(rounds) < most and sum(rounds) < PROBE_BUDGET_SECONDS):
        rounds.append(_timed(fn))
    return statistics.median(rounds)


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()  # train_epoch and evaluate read their sums from the device, so the clock waits for the work
    return time.perf_counter() - start


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# --- running several specs in order ---------------------------------------------------------------


class PlanError(FmnistError):
    """Specs that cannot run together as one plan."""


def check_distinct_experiments(specs: list[tuple[Path, Config]]) -> None:
    """Each spec of a plan runs into its own experiment: two that name the same one are refused."""
    first: dict[str, Path] = {}
    for path, cfg in specs:
        if cfg.experiment in first:
            raise PlanError(f"{first[cfg.experiment]} and {path} both name experiment {cfg.experiment!r}: "
                            "pass one of them, or give one another `experiment:`")
        first[cfg.experiment] = path


def finished_before(cfg: Config) -> SweepResult | None:
    """The newest finished sweep of exactly this config (max_evals too), as a result, or None."""
    from fmnist_hpo.records import TrialRecord
    from fmnist_hpo.search.trial_runs import sweep_id
    from fmnist_hpo.tags import INTERRUPTED, RunStatus, flagged
    from fmnist_hpo.tracking.store import resolve_tracking_uri
    from fmnist_hpo.tracking.writer import Tracker

    tracker = Tracker(resolve_tracking_uri(cfg.mlflow.tracking_uri), cfg.experiment)
    same = [p for p in tracker.sweeps(sweep_id(cfg), (RunStatus.FINISHED,))
            if p.params.get("search.max_evals") == str(cfg.search.max_evals)]
    if not same:
        return None
    models_dir = models_folder(cfg.models_dir, cfg.experiment)
    trials = [TrialRecord.from_logged(t, models_dir) for t in tracker.trials_of(same[0].run_id)
              if not flagged(t.tags, INTERRUPTED)]
    return SweepResult(cfg.experiment, same[0].run_id, cfg.search.metric, trials)


def run_spec(cfg: Config, resolved: Resolved, mode: ResumeMode, ask: Ask,
             show_bars: bool | None, on_ready: Callable[[], None] | None = None) -> SpecOutcome:
    """One spec of several: skipped when it finished before (unless mode is fresh), else run or continued."""
    from fmnist_hpo.search.sweep import SweepFailed, run_from_config

    if mode != ResumeMode.FRESH:
        earlier = finished_before(cfg)
        if earlier is not None:
            if on_ready is not None:
                on_ready()
            return SpecOutcome(cfg.experiment, SpecStatus.DONE_BEFORE, earlier)
    start = time.perf_counter()
    try:
        result = run_from_config(cfg, resolved, show_bars, mode, ask=ask, on_ready=on_ready)
    except SweepFailed as exc:
        return SpecOutcome(cfg.experiment, SpecStatus.FAILED, exc.result, time.perf_counter() - start)
    return SpecOutcome(cfg.experiment, SpecStatus.FINISHED, result, time.perf_counter() - start)
