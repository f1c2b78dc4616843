"""The sweep driver: every configuration is trained once (repeats aside), tested once and logged.

strategy.py chooses the configurations (a grid's points, or Hyperopt's proposals, one proposed
again answered from its stored result); this module runs each as trials on one device, one at a
time, and takes an interrupted sweep back from the store. With several trials at once
(search.parallel above 1, or `auto` on a GPU with room for more, see packing.py) the same search
runs on Ray Tune (ray_engine.py). Both write MLflow through trial_runs.SweepRuns.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from loguru import logger

from fmnist_hpo.config.loading import to_dict
from fmnist_hpo.config.sections import Config, validate
from fmnist_hpo.config.space import planned_points
from fmnist_hpo.data.datasets import dataset_named
from fmnist_hpo.data.lineage import idx_digest
from fmnist_hpo.data.loading import load_dataset
from fmnist_hpo.data.splits import SplitCache
from fmnist_hpo.errors import FmnistError, first_line
from fmnist_hpo.faults import machine_failure
from fmnist_hpo.files import state_file
from fmnist_hpo.records import EpochMetrics, LoggedTrial, SweepResult, TrialRecord, TrialStatus
from fmnist_hpo.search.interrupts import raise_if_requested
from fmnist_hpo.search.packing import parallel_for
from fmnist_hpo.search.preflight import Resolved, preflight
from fmnist_hpo.search.progress import SweepProgress
from fmnist_hpo.search.pruning import MedianPruner, best_so_far
from fmnist_hpo.search.resume import Ask, ResumeMode, choose_parent, reload
from fmnist_hpo.search.strategy import Trained, explore
from fmnist_hpo.search.trial_runs import Lineage, SweepRuns, trial_config
from fmnist_hpo.selection import objective
from fmnist_hpo.tags import SEARCH_NOTE, WALL_SECONDS
from fmnist_hpo.tracking.store import TrackingError
from fmnist_hpo.tracking.writer import Tracker
from fmnist_hpo.training.checkpoints import CheckpointError, read_training_state, save_checkpoint, save_training_state
from fmnist_hpo.training.hooks import FitHooks
from fmnist_hpo.training.loop import train_and_test
from fmnist_hpo.training.repair import LostCheckpoint


class SweepFailed(FmnistError):
    """Every trial of a sweep failed."""

    def __init__(self, message: str, result: SweepResult) -> None:
        super().__init__(message)
        self.result = result


class Sweep:
    """Runs cfg's search on one device, one trial at a time (or hands it to Ray for parallel trials)."""

    def __init__(self, cfg: Config, data: SplitCache, tracker: Tracker, show_bars: bool | None = None,
                 lineage: Lineage | None = None) -> None:
        self.cfg = cfg
        self.data = data
        self.device = data.device
        self.tracker = tracker
        self.show_bars = show_bars
        self.runs = SweepRuns(cfg, tracker, str(data.device), lineage)
        self.pruner = MedianPruner(cfg.search.grace_epochs) if cfg.search.pruner == "median" else None
        self.interrupted: dict[tuple[int, int], LoggedTrial] = {}  # (point, repeat) -> run to continue
        self.lost: list[LoggedTrial] = []  # finished trials whose checkpoint is gone: trained again in new runs
        self._points = itertools.count()

    def run(self, resume_parent: str | None = None) -> SweepResult:
        cfg = self.cfg
        result = SweepResult(cfg.experiment, "", cfg.search.metric)
        try:
            if resume_parent:
                self._reload(resume_parent, result)
            else:
                self.runs.start_parent()
            result.parent_run_id = self.runs.parent_id
            search = cfg.search
            total = planned_points(search.space, search.algo, search.max_evals) * search.repeats
            with SweepProgress(total, cfg.train.epochs, self.show_bars) as progress:
                progress.skip(len(result.trials))
                self._search(result, progress)
            raise_if_requested()  # a signal Hyperopt or a garbage-collection callback swallowed
            if result.note:
                logger.info(result.note)
                self.tracker.set_tags(result.parent_run_id, {SEARCH_NOTE: result.note})
            self.runs.finish_parent(result)
        except BaseException:
            self.runs.kill_open()
            raise
        return result

    def _reload(self, parent: str, result: SweepResult) -> None:
        """Take back the finished trials of an interrupted sweep and note the ones to continue."""
        logged = self.runs.continue_parent(parent)
        reloaded = reload(logged, self.runs.models_dir)
        self.lost = self._lost_checkpoints(reloaded.done, logged)
        lost_ids = {t.run_id for t in self.lost}
        result.trials.extend(t for t in reloaded.done if t.run_id not in lost_ids)
        self.interrupted = {(t.point, t.repeat): t for t in reloaded.interrupted}
        started = [t.point for t in result.trials] + [p for p, _ in self.interrupted] + [t.point for t in self.lost]
        self._points = itertools.count(1 + max(started, default=-1))
        if self.pruner is not None:
            for trial in reloaded.done:
                if trial.status == TrialStatus.OK and trial.run_id not in lost_ids:  # a lost one is trained again
                    self.pruner.record(self.curve(self.tracker.history(trial.run_id)))

    def _lost_checkpoints(self, done: list[TrialRecord], logged: list[LoggedTrial]) -> list[LoggedTrial]:
        """Finished trials whose checkpoint neither loads nor can be restored from its artifact copy: closed."""
        by_id = {t.run_id: t for t in logged}
        lost = []
        for record in done:
            if record.status != TrialStatus.OK or not np.isfinite(record.test_accuracy):
                continue  # failed, or stopped by a Ray scheduler before its test: no checkpoint
            try:
                record.checkpoint = self.runs.usable_checkpoint(record)
            except LostCheckpoint as exc:
                logger.warning(f"trial {record.number}: {exc.damage}, and its run has no intact copy: "
                               "training its configuration again")
                self.runs.close_lost(record, exc.damage)
                lost.append(by_id[record.run_id])
        return lost

    # --- the search ------------------------------------------------------------------------

    def _search(self, result: SweepResult, progress: SweepProgress) -> None:
        search = self.cfg.search
        parallel, note = parallel_for(self.cfg, self.device, self.data.dataset)
        if note:
            logger.info(note)
        if parallel > 1 and search.space and search.algo != "grid":
            from fmnist_hpo.search.ray_engine import run_on_ray

            with self._system_metrics(result.parent_run_id):  # the workers are other processes: the driver's machine
                run_on_ray(self.runs, result, progress, self.data.dataset, [*self.interrupted.values(), *self.lost],
                           parallel)
            self.interrupted.clear()
            return
        trained = self._finish_started_points(result, progress)
        note = explore(search, trained, lambda values: self.evaluate_point(next(self._points), values, result, progress))
        if note:
            result.note = note

    def _finish_started_points(self, result: SweepResult, progress: SweepProgress) -> Trained:
        """Every configuration started before an interruption, with its missing repeats run (or continued)."""
        values_of = ({t.point: t.values for t in result.trials} | {p: t.values for (p, _), t in self.interrupted.items()}
                     | {t.point: t.values for t in self.lost})
        trained = Trained()
        for point in sorted(values_of):
            trained.record(values_of[point], self.evaluate_point(point, values_of[point], result, progress))
        return trained

    def evaluate_point(self, point: int, values: dict[str, Any], result: SweepResult,
                       progress: SweepProgress) -> float | None:
        """Train one configuration `repeats` times (skipping runs already done); the mean objective."""
        for repeat in range(self.cfg.search.repeats):
            if repeat not in result.runs_of(point):
                result.trials.append(self.run_trial(point, values, repeat, progress))
        losses = [t.objective(self.cfg.search.metric) for t in result.runs_of(point).values() if t.status == TrialStatus.OK]
        return float(np.mean(losses)) if losses else None

    # --- one trial -------------------------------------------------------------------------

    def run_trial(self, point: int, values: dict[str, Any], repeat: int, progress: SweepProgress) -> TrialRecord:
        raise_if_requested()
        interrupted = self.interrupted.pop((point, repeat), None)
        record = self.runs.reopen_trial(interrupted) if interrupted else self.runs.open_trial(point, values, repeat)
        progress.trial_started(record.number, values)
        try:
            trial_cfg = validate(trial_config(self.cfg, values, repeat), source=f"trial {record.number}")
            if interrupted is None:
                self.runs.describe_trial(record, trial_cfg)
            with self._system_metrics(record.run_id):
                self._train(trial_cfg, record, progress)
        except (KeyboardInterrupt, SystemExit, CheckpointError, TrackingError):
            raise  # a corrupt state file or a lost store is the user's to look at, not a trial failure
        except Exception as exc:  # a trial's failure (an invalid sampled point too) is data for the sweep
            failure = machine_failure(exc)
            if failure is not None:  # a full disk or a read-only folder: the sweep stops, resumable
                raise failure from exc
            state_file(self.runs.models_dir, record.run_id).unlink(missing_ok=True)
            self.runs.close_failed(record, _reason(exc))
            _free_device_memory(self.device)
        else:
            self.runs.close_finished(record)
        progress.trial_done(record)
        return record

    def _system_metrics(self, run_id: str) -> contextlib.AbstractContextManager:
        if not self.cfg.mlflow.system_metrics:
            return contextlib.nullcontext()
        return self.tracker.system_metrics(run_id)

    def curve(self, history: list[EpochMetrics]) -> list[float]:
        """Best-so-far of the search objective per epoch (lower is better), for the median pruner."""
        metric = self.cfg.search.metric
        return best_so_far([objective(metric, m.val_loss, m.val_accuracy) for m in history])

    def _train(self, cfg: Config, record: TrialRecord, progress: SweepProgress) -> None:
        splits = self.data.get(cfg.data)
        state_path = state_file(self.runs.models_dir, record.run_id)
        resume = read_training_state(state_path) if state_path.exists() else None
        hooks = TrialHooks(self, record, progress, state_path, resume)
        start = time.perf_counter()
        outcome = train_and_test(cfg, splits, self.device, hooks, resume)
        if self.pruner is not None:
            self.pruner.record(self.curve(hooks.seen))
        outcome.record_into(record)
        record.checkpoint = save_checkpoint(self.runs.checkpoint_path(record), outcome.model,
                                            to_dict(cfg)["model"], dataset_named(cfg.data.dataset),
                                            run_id=record.run_id,
                                            kept_epoch=record.kept_epoch)
        state_path.unlink(missing_ok=True)
        self.tracker.set_tags(record.run_id, {WALL_SECONDS: f"{time.perf_counter() - start:.1f}"})


class TrialHooks(FitHooks):
    """Around each epoch of a sequential trial: log it, show it, save the training state, ask the pruner."""

    def __init__(self, sweep: Sweep, record: TrialRecord, progress: SweepProgress, state_path: Path,
                 resume: dict[str, Any] | None) -> None:
        self.sweep = sweep
        self.record = record
        self.progress = progress
        self.state_path = state_path
        self.seen: list[EpochMetrics] = [EpochMetrics(**m) for m in resume["history"]] if resume else []

    def steps_done(self, done: int, total: int) -> None:
        raise_if_requested()
        self.progress.steps_done(len(self.seen), done, total)

    def epoch_done(self, metrics: EpochMetrics, state: Callable[[], dict[str, Any]]) -> None:
        logged_from = time.perf_counter()
        raise_if_requested()
        self.seen.append(metrics)
        runs = self.sweep.runs
        runs.log_epoch(self.record, metrics)
        self.progress.epoch_done(self.record.number, metrics)
        save_training_state(self.state_path, state())
        runs.log_bookkeeping(self.record, metrics.epoch, time.perf_counter() - logged_from)

    def should_prune(self, metrics: EpochMetrics) -> bool:
        pruner = self.sweep.pruner
        return pruner is not None and pruner.should_prune(self.sweep.curve(self.seen))


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc, 500)}"[:500] if str(exc).strip() else type(exc).__name__


def _free_device_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        with contextlib.suppress(RuntimeError):  # an allocator a failed capture left confused must not end the sweep
            torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def run_from_config(cfg: Config, resolved: Resolved | None = None, show_bars: bool | None = None,
                    mode: ResumeMode = ResumeMode.ASK, ask: Ask = None,
                    on_ready: Callable[[], None] | None = None) -> SweepResult:
    """Everything `fmnist run` does after parsing: every input is checked before anything is written.

    resolved is what preflight(cfg) found (the CLI checks every spec before the first runs); None: checked here.
    on_ready is called once the data is on the device and the store is open, before the first
    question or progress bar (the CLI ends its 'preparing' status there).
    """
    resolved = resolved or preflight(cfg)
    device = torch.device(resolved.device)
    data = SplitCache(load_dataset(cfg.data), device)
    data.get(cfg.data)
    tracker = Tracker(resolved.tracking_uri, cfg.experiment)
    digest = idx_digest(resolved.data_root, dataset_named(cfg.data.dataset))
    lineage = Lineage(data.dataset, str(resolved.data_root), digest)
    if on_ready is not None:
        on_ready()
    parent = choose_parent(tracker, cfg, mode, ask, say=logger.info)
    result = Sweep(cfg, data, tracker, show_bars, lineage).run(resume_parent=parent)
    if not result.finished:
        count = f"all {len(result.trials)} trials" if len(result.trials) > 1 else "the only trial"
        raise SweepFailed(f"{count} failed; first reason: {result.trials[0].reason}", result)
    return result
