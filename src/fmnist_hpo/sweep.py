"""The search objective and the sequential sweep driver (Hyperopt's fmin, one trial at a time)."""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from fmnist_hpo import config as config_module
from fmnist_hpo.checkpoints import load_model, save_checkpoint
from fmnist_hpo.config import Config
from fmnist_hpo.data import SplitCache, load_dataset
from fmnist_hpo.errors import FmnistError
from fmnist_hpo.model import with_normalization
from fmnist_hpo.progress import SweepProgress
from fmnist_hpo.space import grid_points, plain_values, planned_points, to_hyperopt
from fmnist_hpo.tracking import Tracker
from fmnist_hpo.train import EpochMetrics, train_and_test


class SweepFailed(FmnistError):
    """Every trial of a sweep failed."""

    def __init__(self, message: str, result: SweepResult) -> None:
        super().__init__(message)
        self.result = result


class OutputError(FmnistError):
    """A folder the sweep must write to cannot be written."""


@dataclass
class TrialRecord:
    number: int
    run_id: str
    values: dict[str, Any]
    repeat: int = 0
    status: str = "ok"  # ok | failed
    reason: str | None = None
    best_train_accuracy: float = math.nan
    best_val_accuracy: float = math.nan
    best_val_loss: float = math.nan
    test_accuracy: float = math.nan
    test_loss: float = math.nan
    epochs_run: int = 0
    train_seconds: float = 0.0
    total_parameters: int = 0
    checkpoint: Path | None = None

    def objective(self, metric: str) -> float:
        """What the search minimises: val_loss, or minus val_accuracy."""
        return self.best_val_loss if metric == "val_loss" else -self.best_val_accuracy

    def final_metrics(self) -> dict[str, float]:
        return {
            "best_train_accuracy": self.best_train_accuracy,
            "best_val_accuracy": self.best_val_accuracy, "best_val_loss": self.best_val_loss,
            "test_accuracy": self.test_accuracy, "test_loss": self.test_loss,
            "total_parameters": self.total_parameters, "train_seconds": self.train_seconds,
            "epochs_run": self.epochs_run,
        }


@dataclass
class SweepResult:
    experiment: str
    parent_run_id: str
    metric: str
    trials: list[TrialRecord] = field(default_factory=list)

    @property
    def finished(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.status == "ok"]

    @property
    def failed(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.status != "ok"]

    @property
    def best(self) -> TrialRecord | None:
        candidates = [t for t in self.finished if math.isfinite(t.objective(self.metric))]
        return min(candidates, key=lambda t: t.objective(self.metric), default=None)


class Sweep:
    """Runs cfg's search: each trial is validated, trained, tested once and logged as a nested run."""

    def __init__(self, cfg: Config, data: SplitCache, tracker: Tracker, show_bars: bool | None = None) -> None:
        self.cfg = cfg
        self.data = data
        self.device = data.device
        self.tracker = tracker
        self.show_bars = show_bars
        self._active_run: str | None = None

    def run(self) -> SweepResult:
        cfg = self.cfg
        parent = self.tracker.start_run(
            f"sweep-{config_module.config_hash(cfg)}",
            params=config_module.flatten(config_module.to_dict(cfg)),
            tags={"fmnist.role": "sweep", "config_hash": config_module.config_hash(cfg),
                  "device": str(self.device), "mlflow.note.content": cfg.description},
        )
        self.tracker.log_text(parent, config_module.dump_yaml(cfg), "config.yaml")
        result = SweepResult(cfg.experiment, parent, cfg.search.metric)
        try:
            with SweepProgress(planned_points(cfg.search) * cfg.search.repeats, cfg.train.epochs, self.show_bars) as progress:
                self._search(result, progress)
            self._finish(result)
        except BaseException:
            if self._active_run:
                self.tracker.end_run(self._active_run, "KILLED")
            self.tracker.end_run(parent, "KILLED")
            raise
        return result

    def _search(self, result: SweepResult, progress: SweepProgress) -> None:
        search = self.cfg.search
        if not search.space or search.algo == "grid":
            for values in grid_points(search.space) if search.space else [{}]:
                self.evaluate_point(values, result, progress)
            return
        from hyperopt import STATUS_FAIL, STATUS_OK, Trials, anneal, fmin, rand, tpe
        from hyperopt.exceptions import AllTrialsFailed

        algo = {"tpe": tpe, "random": rand, "anneal": anneal}[search.algo].suggest

        def objective(point: dict[str, Any]) -> dict[str, Any]:
            loss = self.evaluate_point(plain_values(point), result, progress)
            return {"status": STATUS_FAIL} if loss is None else {"status": STATUS_OK, "loss": loss}

        # every failure is already recorded; run_from_config reports a sweep with no finished trial
        with contextlib.suppress(AllTrialsFailed):
            fmin(objective, to_hyperopt(search.space), algo=algo, max_evals=search.max_evals, trials=Trials(),
                 rstate=np.random.default_rng(search.seed), show_progressbar=False, return_argmin=False)

    def evaluate_point(self, values: dict[str, Any], result: SweepResult, progress: SweepProgress) -> float | None:
        """Train one configuration `repeats` times; the mean objective of the runs that finished."""
        losses = []
        for repeat in range(self.cfg.search.repeats):
            record = self.run_trial(len(result.trials), values, repeat, result.parent_run_id, progress)
            result.trials.append(record)
            if record.status == "ok":
                losses.append(record.objective(self.cfg.search.metric))
        return float(np.mean(losses)) if losses else None

    def run_trial(self, number: int, values: dict[str, Any], repeat: int, parent_id: str,
                  progress: SweepProgress) -> TrialRecord:
        overrides = {**values, "train.seed": self.cfg.train.seed + repeat} if repeat else values
        raw = config_module.apply_overrides(config_module.to_dict(self.cfg), overrides)
        run_id = self.tracker.start_run(
            f"trial-{number:03d}",
            params=config_module.flatten(raw),
            tags={"fmnist.role": "trial", "trial": str(number), "repeat": str(repeat), "device": str(self.device),
                  "sampled": yaml.safe_dump(values, sort_keys=False).strip()},
            parent_id=parent_id,
        )
        self._active_run = run_id
        record = TrialRecord(number, run_id, values, repeat)
        progress.trial_started(number, values)
        try:
            trial_cfg = config_module.validate(raw, source=f"trial {number}")
            self.tracker.set_tags(run_id, {"config_hash": config_module.config_hash(trial_cfg)})
            self.tracker.log_text(run_id, config_module.dump_yaml(trial_cfg), "config.yaml")
            self._train(trial_cfg, record, progress)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # a trial's failure is data for the sweep, not the end of it
            record.status, record.reason = "failed", _reason(exc)
            self.tracker.set_tags(run_id, {"failure_reason": record.reason})
            self.tracker.end_run(run_id, "FAILED")
            _free_device_memory(self.device)
        else:
            self.tracker.log_metrics(run_id, record.final_metrics())
            self.tracker.end_run(run_id, "FINISHED")
        self._active_run = None
        progress.trial_done(record)
        return record

    def _train(self, cfg: Config, record: TrialRecord, progress: SweepProgress) -> None:
        splits = self.data.get(cfg.data)

        def on_epoch(m: EpochMetrics) -> None:
            self.tracker.log_metrics(record.run_id, m.as_dict(), step=m.epoch)
            progress.epoch_done(record.number, m)

        start = time.perf_counter()
        outcome = train_and_test(cfg, splits, self.device, on_epoch)
        best = outcome.fit.best
        record.best_train_accuracy = best.train_accuracy
        record.best_val_accuracy, record.best_val_loss = best.val_accuracy, best.val_loss
        record.test_accuracy, record.test_loss = outcome.test_accuracy, outcome.test_loss
        record.epochs_run = len(outcome.fit.history)
        record.train_seconds = outcome.fit.train_seconds
        record.total_parameters = outcome.total_parameters
        path = Path(cfg.models_dir) / cfg.experiment / f"{record.run_id}.pt"
        record.checkpoint = save_checkpoint(path, outcome.model, config_module.to_dict(cfg)["model"],
                                            run_id=record.run_id, best_epoch=outcome.fit.best_epoch)
        self.tracker.log_file(record.run_id, path, "checkpoint")
        self.tracker.set_tags(record.run_id, {"best_epoch": outcome.fit.best_epoch,
                                              "wall_seconds": f"{time.perf_counter() - start:.1f}"})
        if self.cfg.mlflow.log_model == "all":
            self.log_model(record)

    def log_model(self, record: TrialRecord) -> str:
        model = with_normalization(load_model(record.checkpoint))
        example = np.zeros((2, 1, 28, 28), dtype=np.float32)  # batch 2 keeps the batch dim dynamic
        uri = self.tracker.log_pytorch_model(record.run_id, model, example)
        self.tracker.set_tags(record.run_id, {"model_uri": uri})
        return uri

    def _finish(self, result: SweepResult) -> None:
        best = result.best
        parent = result.parent_run_id
        self.tracker.log_metrics(parent, {"trials_finished": len(result.finished), "trials_failed": len(result.failed)})
        if best is None:
            self.tracker.end_run(parent, "FAILED")
            return
        if self.cfg.mlflow.log_model == "best":
            self.log_model(best)
        self.tracker.set_tags(parent, {"best_run_id": best.run_id, "best_trial": best.number,
                                       "best_values": yaml.safe_dump(best.values, sort_keys=False).strip()})
        self.tracker.log_metrics(parent, {f"best_{k}" if not k.startswith("best_") else k: v
                                          for k, v in best.final_metrics().items()})
        self.tracker.end_run(parent, "FINISHED")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:500] if text else type(exc).__name__


def _free_device_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create the checkpoint folder ({exc.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{folder}: the checkpoint folder is not writable")


def run_from_config(cfg: Config, show_bars: bool | None = None) -> SweepResult:
    """Everything `fmnist run` does after parsing: every input is checked before MLflow is touched."""
    from fmnist_hpo.tracking import resolve_tracking_uri
    from fmnist_hpo.train import resolve_device, resolve_precision

    device = resolve_device(cfg.train.device)
    resolve_precision(cfg.train.precision, device)
    data = SplitCache(load_dataset(cfg.data), device)
    data.get(cfg.data)
    check_writable(Path(cfg.models_dir) / cfg.experiment)
    tracker = Tracker(resolve_tracking_uri(cfg.mlflow.tracking_uri), cfg.experiment)
    result = Sweep(cfg, data, tracker, show_bars).run()
    if not result.finished:
        raise SweepFailed(f"all {len(result.trials)} trials failed; first reason: {result.trials[0].reason}", result)
    return result
