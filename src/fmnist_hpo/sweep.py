"""The search objective and the sequential sweep driver (Hyperopt's fmin, one trial at a time).

MLflow is the sweep's memory: every trial run carries its sampled values, its point (the index of
the configuration in the search) and its repeat, so an interrupted sweep is rebuilt from the store
and continued in the same parent run. A trial writes its whole training state after every epoch,
so an interrupted trial continues from its last finished epoch.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from fmnist_hpo import config as config_module
from fmnist_hpo.checkpoints import (
    CheckpointError,
    atomic_write,
    read_training_state,
    save_checkpoint,
    save_training_state,
)
from fmnist_hpo.config import Config
from fmnist_hpo.data import SplitCache, load_dataset
from fmnist_hpo.errors import FmnistError
from fmnist_hpo.modelops import log_trial_model
from fmnist_hpo.progress import SweepProgress
from fmnist_hpo.pruning import MedianPruner, best_so_far
from fmnist_hpo.space import grid_points, plain_values, planned_points, to_hyperopt, to_hyperopt_vals
from fmnist_hpo.tracking import LoggedTrial, Tracker
from fmnist_hpo.train import EpochMetrics, train_and_test


class SweepFailed(FmnistError):
    """Every trial of a sweep failed."""

    def __init__(self, message: str, result: SweepResult) -> None:
        super().__init__(message)
        self.result = result


class OutputError(FmnistError):
    """A folder the sweep must write to cannot be written."""


class ResumeError(FmnistError):
    """An earlier sweep cannot be continued as asked."""


@dataclass
class TrialRecord:
    number: int
    run_id: str
    values: dict[str, Any]
    point: int = 0
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
    pruned_at: int | None = None
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

    @classmethod
    def from_logged(cls, trial: LoggedTrial, models_dir: Path) -> TrialRecord:
        m = trial.metrics
        return cls(
            number=trial.number, run_id=trial.run_id, values=trial.values, point=trial.point, repeat=trial.repeat,
            status="ok" if trial.status == "FINISHED" else "failed", reason=trial.tags.get("failure_reason"),
            best_train_accuracy=m.get("best_train_accuracy", math.nan),
            best_val_accuracy=m.get("best_val_accuracy", math.nan), best_val_loss=m.get("best_val_loss", math.nan),
            test_accuracy=m.get("test_accuracy", math.nan), test_loss=m.get("test_loss", math.nan),
            epochs_run=int(m.get("epochs_run", 0)), train_seconds=m.get("train_seconds", 0.0),
            total_parameters=int(m.get("total_parameters", 0)), checkpoint=models_dir / f"{trial.run_id}.pt",
            pruned_at=int(trial.tags["pruned_at_epoch"]) if "pruned_at_epoch" in trial.tags else None,
        )


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
        candidates = [t for t in self.finished if math.isfinite(t.objective(self.metric)) and math.isfinite(t.test_accuracy)]
        return min(candidates, key=lambda t: t.objective(self.metric), default=None)

    def runs_of(self, point: int) -> dict[int, TrialRecord]:
        return {t.repeat: t for t in self.trials if t.point == point}


def sweep_id(cfg: Config) -> str:
    """The identity of a sweep: its config without what may change between a run and its resume."""
    raw = config_module.to_dict(cfg)
    raw["search"].pop("max_evals")
    raw.pop("mlflow")
    raw.pop("description")
    return config_module.hash_of(raw)


class Sweep:
    """Runs cfg's search: each trial is validated, trained, tested once and logged as a nested run."""

    def __init__(self, cfg: Config, data: SplitCache, tracker: Tracker, show_bars: bool | None = None) -> None:
        self.cfg = cfg
        self.data = data
        self.device = data.device
        self.tracker = tracker
        self.show_bars = show_bars
        self.models_dir = Path(cfg.models_dir) / cfg.experiment
        self._active_run: str | None = None
        self.interrupted: dict[tuple[int, int], LoggedTrial] = {}  # (point, repeat) -> run to continue
        self.pruner = MedianPruner(cfg.search.grace_epochs) if cfg.search.pruner == "median" else None
        self._open: dict[str, TrialRecord] = {}  # Ray trials running now, by MLflow run id
        self.abandoned: list[LoggedTrial] = []  # Ray trials cut off by an interruption (numbers stay taken)

    # --- the sweep ----------------------------------------------------------------------------

    def run(self, resume_parent: str | None = None) -> SweepResult:
        cfg = self.cfg
        parent = resume_parent or self._start_parent()
        result = SweepResult(cfg.experiment, parent, cfg.search.metric)
        try:
            if resume_parent:
                self._reload(result)
            total = planned_points(cfg.search) * cfg.search.repeats
            with SweepProgress(total, cfg.train.epochs, self.show_bars) as progress:
                progress.skip(len(result.trials))
                self._search(result, progress)
            self._finish(result)
        except BaseException:
            for run_id in filter(None, [self._active_run, *self._open]):
                self.tracker.end_run(run_id, "KILLED")
            self.tracker.end_run(parent, "KILLED")
            raise
        return result

    def _start_parent(self) -> str:
        cfg = self.cfg
        parent = self.tracker.start_run(
            f"sweep-{config_module.config_hash(cfg)}",
            params=config_module.flatten(config_module.to_dict(cfg)),
            tags={"fmnist.role": "sweep", "sweep_id": sweep_id(cfg), "config_hash": config_module.config_hash(cfg),
                  "device": str(self.device), "mlflow.note.content": cfg.description, **process_tags()},
        )
        self.tracker.log_text(parent, config_module.dump_yaml(cfg), "config.yaml")
        return parent

    def _reload(self, result: SweepResult) -> None:
        """Take back the finished trials of an interrupted sweep and note the ones to continue."""
        self.tracker.reopen(result.parent_run_id, process_tags())
        for trial in self.tracker.trials_of(result.parent_run_id):
            if trial.tags.get("interrupted") == "true":
                continue  # a Ray trial cut off by an interruption: rerun, not counted
            if trial.status == "FINISHED" or (trial.status == "FAILED" and "failure_reason" in trial.tags):
                result.trials.append(TrialRecord.from_logged(trial, self.models_dir))
                if self.pruner is not None and trial.status == "FINISHED":
                    self.pruner.record(best_so_far(self._objectives(self.tracker.history(trial.run_id))))
            else:  # RUNNING after a crash, KILLED after Ctrl-C, or FAILED by an abandoned resume
                self.interrupted[(trial.point, trial.repeat)] = trial

    def _search(self, result: SweepResult, progress: SweepProgress) -> None:
        search = self.cfg.search
        if not search.space or search.algo == "grid":
            for point, values in enumerate(grid_points(search.space) if search.space else [{}]):
                self.evaluate_point(point, values, result, progress)
            return
        if search.parallel > 1:
            from fmnist_hpo.ray_engine import run_on_ray

            run_on_ray(self, result, progress, self.data.dataset)
            return
        from hyperopt import STATUS_FAIL, STATUS_OK, anneal, fmin, rand, tpe
        from hyperopt.exceptions import AllTrialsFailed

        algo = {"tpe": tpe, "random": rand, "anneal": anneal}[search.algo].suggest
        trials = self._history(result, progress)
        next_point = itertools.count(1 + max((t.point for t in result.trials), default=-1))

        def objective(point: dict[str, Any]) -> dict[str, Any]:
            loss = self.evaluate_point(next(next_point), plain_values(point), result, progress)
            return {"status": STATUS_FAIL} if loss is None else {"status": STATUS_OK, "loss": loss}

        # a resumed search draws from a new stream, or random search would repeat its first points
        rstate = np.random.default_rng([search.seed, len(trials.trials)] if trials.trials else search.seed)
        # every failure is already recorded; run_from_config reports a sweep with no finished trial
        with contextlib.suppress(AllTrialsFailed):
            fmin(objective, to_hyperopt(search.space), algo=algo, max_evals=search.max_evals, trials=trials,
                 rstate=rstate, show_progressbar=False, return_argmin=False)

    def _history(self, result: SweepResult, progress: SweepProgress) -> Any:
        """Hyperopt Trials holding the points evaluated before an interruption, completed first."""
        from hyperopt import Trials

        trials = Trials()
        points = sorted({t.point for t in result.trials} | {p for p, _ in self.interrupted})
        for point in points[: self.cfg.search.max_evals]:
            values = next((t.values for t in result.trials if t.point == point), None)
            if values is None:
                values = self.interrupted[next(k for k in self.interrupted if k[0] == point)].values
            loss = self.evaluate_point(point, values, result, progress)
            add_to_history(trials, self.cfg.search.space, values, loss)
        trials.refresh()
        return trials

    def evaluate_point(self, point: int, values: dict[str, Any], result: SweepResult,
                       progress: SweepProgress) -> float | None:
        """Train one configuration `repeats` times (skipping runs already done); the mean objective."""
        for repeat in range(self.cfg.search.repeats):
            if repeat not in result.runs_of(point):
                result.trials.append(self.run_trial(point, values, repeat, result, progress))
        losses = [t.objective(self.cfg.search.metric) for t in result.runs_of(point).values() if t.status == "ok"]
        return float(np.mean(losses)) if losses else None

    # --- one trial ----------------------------------------------------------------------------

    def run_trial(self, point: int, values: dict[str, Any], repeat: int, result: SweepResult,
                  progress: SweepProgress) -> TrialRecord:
        overrides = {**values, "train.seed": self.cfg.train.seed + repeat} if repeat else values
        raw = config_module.apply_overrides(config_module.to_dict(self.cfg), overrides)
        interrupted = self.interrupted.pop((point, repeat), None)
        if interrupted is not None:
            number, run_id = interrupted.number, interrupted.run_id
            self.tracker.reopen(run_id, {"resumed": "after an interruption"})
        else:
            number = self._next_number(result)
            run_id = self._start_child_run(number, point, repeat, values, raw, result.parent_run_id)
        self._active_run = run_id
        record = TrialRecord(number, run_id, values, point, repeat)
        progress.trial_started(number, values)
        try:
            trial_cfg = config_module.validate(raw, source=f"trial {number}")
            if interrupted is None:
                self.tracker.set_tags(run_id, {"config_hash": config_module.config_hash(trial_cfg)})
                self.tracker.log_text(run_id, config_module.dump_yaml(trial_cfg), "config.yaml")
            self._train(trial_cfg, record, progress)
        except (KeyboardInterrupt, SystemExit, CheckpointError):
            raise  # a corrupt state file is the user's to look at, not a trial failure
        except Exception as exc:  # a trial's failure (an invalid sampled point too) is data for the sweep
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

    def _next_number(self, result: SweepResult) -> int:
        """The next free trial number: after every run of this sweep, finished, running or cut off."""
        taken = [*result.trials, *self._open.values(), *self.interrupted.values(), *self.abandoned]
        return 1 + max((t.number for t in taken), default=-1)

    def _start_child_run(self, number: int, point: int, repeat: int, values: dict[str, Any], raw: dict[str, Any],
                         parent_id: str, tags: dict[str, str] | None = None) -> str:
        return self.tracker.start_run(
            f"trial-{number:03d}", params=config_module.flatten(raw),
            tags={"fmnist.role": "trial", "trial": str(number), "point": str(point), "repeat": str(repeat),
                  "device": str(self.device), "sampled": yaml.safe_dump(values, sort_keys=False).strip(),
                  **(tags or {})},
            parent_id=parent_id,
        )

    def _objectives(self, history: list[EpochMetrics]) -> list[float]:
        """Per-epoch values of the search objective (lower is better)."""
        if self.cfg.search.metric == "val_loss":
            return [m.val_loss for m in history]
        return [-m.val_accuracy for m in history]

    def _train(self, cfg: Config, record: TrialRecord, progress: SweepProgress) -> None:
        splits = self.data.get(cfg.data)
        state_path = self.models_dir / f"{record.run_id}.state.pt"
        resume = read_training_state(state_path) if state_path.exists() else None
        seen: list[EpochMetrics] = [EpochMetrics(**m) for m in resume["history"]] if resume else []

        def on_epoch(m: EpochMetrics) -> None:
            seen.append(m)
            self.tracker.log_metrics(record.run_id, m.as_dict(), step=m.epoch)
            progress.epoch_done(record.number, m)

        def should_prune(_: EpochMetrics) -> bool:
            return self.pruner is not None and self.pruner.should_prune(best_so_far(self._objectives(seen)))

        start = time.perf_counter()
        outcome = train_and_test(cfg, splits, self.device, on_epoch, resume,
                                 save_state=lambda state: save_training_state(state_path, state),
                                 should_prune=should_prune)
        if self.pruner is not None:
            self.pruner.record(best_so_far(self._objectives(seen)))
        record.pruned_at = outcome.fit.pruned_at
        if record.pruned_at is not None:
            self.tracker.set_tags(record.run_id, {"pruned": "true", "pruned_at_epoch": record.pruned_at})
        best = outcome.fit.kept
        record.best_train_accuracy = best.train_accuracy
        record.best_val_accuracy, record.best_val_loss = best.val_accuracy, best.val_loss
        record.test_accuracy, record.test_loss = outcome.test_accuracy, outcome.test_loss
        record.epochs_run = len(outcome.fit.history)
        record.train_seconds = outcome.fit.train_seconds
        record.total_parameters = outcome.total_parameters
        path = self.models_dir / f"{record.run_id}.pt"
        record.checkpoint = save_checkpoint(path, outcome.model, config_module.to_dict(cfg)["model"],
                                            run_id=record.run_id, best_epoch=outcome.fit.kept_epoch)
        self.tracker.log_file(record.run_id, path, "checkpoint")
        state_path.unlink(missing_ok=True)
        self.tracker.set_tags(record.run_id, {"best_epoch": outcome.fit.kept_epoch,
                                              "wall_seconds": f"{time.perf_counter() - start:.1f}"})
        if self.cfg.mlflow.log_model == "all":
            self.log_model(record)

    # --- runs fed by the Ray engine (trials train elsewhere; only this process writes MLflow) ---

    def open_trial_run(self, values: dict[str, Any], result: SweepResult, progress: SweepProgress,
                       tags: dict[str, str]) -> TrialRecord:
        number = self._next_number(result)
        raw = config_module.apply_overrides(config_module.to_dict(self.cfg), values)
        run_id = self._start_child_run(number, number, 0, values, raw, result.parent_run_id, tags)
        self.tracker.log_text(run_id, yaml.safe_dump(raw, sort_keys=False), "config.yaml")
        record = self._open[run_id] = TrialRecord(number, run_id, values, number, 0)
        progress.trial_started(number, values)
        return record

    def close_trial_run(self, record: TrialRecord, final: dict[str, Any], model_file: Path,
                        result: SweepResult, progress: SweepProgress) -> None:
        for key in ("best_train_accuracy", "best_val_accuracy", "best_val_loss", "test_accuracy", "test_loss",
                    "train_seconds"):
            setattr(record, key, float(final[key]))
        record.epochs_run, record.total_parameters = int(final["epochs_run"]), int(final["total_parameters"])
        path = self.models_dir / f"{record.run_id}.pt"
        atomic_write(path, lambda tmp: shutil.copyfile(model_file, tmp))
        record.checkpoint = path
        self.tracker.log_file(record.run_id, path, "checkpoint")
        self.tracker.set_tags(record.run_id, {"best_epoch": int(final["best_epoch"])})
        self._close(record, "FINISHED", result, progress)

    def close_pruned_run(self, record: TrialRecord, history: list[EpochMetrics], result: SweepResult,
                         progress: SweepProgress) -> None:
        """A trial the scheduler stopped: finished, tagged pruned, with its validation numbers so far."""
        record.pruned_at = history[-1].epoch if history else 0
        record.epochs_run = len(history)
        record.best_val_accuracy = max((m.val_accuracy for m in history), default=math.nan)
        record.best_val_loss = min((m.val_loss for m in history), default=math.nan)
        record.train_seconds = sum(m.epoch_seconds for m in history)
        self.tracker.set_tags(record.run_id, {"pruned": "true", "pruned_at_epoch": record.pruned_at})
        self._close(record, "FINISHED", result, progress)

    def fail_trial_run(self, record: TrialRecord, reason: str, result: SweepResult, progress: SweepProgress) -> None:
        record.status, record.reason = "failed", reason
        self.tracker.set_tags(record.run_id, {"failure_reason": reason})
        self._close(record, "FAILED", result, progress)

    def _close(self, record: TrialRecord, status: str, result: SweepResult, progress: SweepProgress) -> None:
        if status == "FINISHED":
            self.tracker.log_metrics(record.run_id, {k: v for k, v in record.final_metrics().items() if v == v})
        self.tracker.end_run(record.run_id, status)
        self._open.pop(record.run_id, None)
        result.trials.append(record)
        progress.trial_done(record)

    def log_model(self, record: TrialRecord) -> str:
        return log_trial_model(self.tracker, record.run_id, record.checkpoint)

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


def add_to_history(trials: Any, space: dict[str, dict[str, Any]], values: dict[str, Any], loss: float | None) -> None:
    """Record an evaluated point in Hyperopt Trials (loss None: a failed point), as fmin would have."""
    from hyperopt import JOB_STATE_DONE, STATUS_FAIL, STATUS_OK

    (tid,) = trials.new_trial_ids(1)
    misc = {"tid": tid, "cmd": ("domain_attachment", "FMinIter_Domain"), "workdir": None,
            "idxs": {key: [tid] for key in space}, "vals": to_hyperopt_vals(space, values)}
    outcome = {"status": STATUS_FAIL} if loss is None else {"status": STATUS_OK, "loss": loss}
    doc = trials.new_trial_docs([tid], [None], [outcome], [misc])[0]
    doc["state"] = JOB_STATE_DONE
    trials.insert_trial_docs([doc])


def process_tags() -> dict[str, str]:
    return {"pid": str(os.getpid()), "host": os.uname().nodename}


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


def _alive_elsewhere(trial_tags: dict[str, str]) -> bool:
    """Whether the process that ran a sweep is still running on this host."""
    if trial_tags.get("host") != os.uname().nodename or not trial_tags.get("pid", "").isdigit():
        return False
    pid = int(trial_tags["pid"])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def choose_parent(tracker: Tracker, cfg: Config, mode: str, ask: Any = None) -> str | None:
    """The interrupted sweep to continue, or None for a fresh one.

    mode: 'resume' continues without asking, 'fresh' starts anew (closing what was left RUNNING),
    'ask' asks through ask(question) -> bool, or starts fresh when ask is None.
    """
    candidates = tracker.unfinished_sweeps(sweep_id(cfg))
    if not candidates:
        if mode == "resume":
            raise ResumeError(f"no interrupted sweep of this config in experiment {cfg.experiment!r} to resume")
        return None
    parent = candidates[0]
    if _alive_elsewhere(parent.tags):
        raise ResumeError(f"this sweep is still running (pid {parent.tags['pid']}); "
                          "wait for it, or start another with --fresh")
    if mode == "ask" and ask is not None:
        mode = "resume" if ask(f"An interrupted sweep of this config exists (run {parent.run_id}). Continue it?") else "fresh"
    keep = parent.run_id if mode == "resume" else None
    for stale in candidates:  # older interrupted copies (and, for --fresh, this one) are closed
        if stale.run_id != keep:
            tracker.abandon(stale.run_id, "abandoned: a fresh sweep of the same config was started"
                            if keep is None else f"abandoned: superseded by the resumed sweep {keep}")
    return keep


def run_from_config(cfg: Config, show_bars: bool | None = None, resume: str = "ask", ask: Any = None) -> SweepResult:
    """Everything `fmnist run` does after parsing: every input is checked before anything is written."""
    from fmnist_hpo.tracking import check_sqlite_location, resolve_tracking_uri
    from fmnist_hpo.train import resolve_device, resolve_precision

    device = resolve_device(cfg.train.device)
    resolve_precision(cfg.train.precision, device)
    data = SplitCache(load_dataset(cfg.data), device)
    data.get(cfg.data)
    tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    check_sqlite_location(tracking_uri)
    check_writable(Path(cfg.models_dir) / cfg.experiment)
    tracker = Tracker(tracking_uri, cfg.experiment)
    parent = choose_parent(tracker, cfg, resume, ask)
    result = Sweep(cfg, data, tracker, show_bars).run(resume_parent=parent)
    if not result.finished:
        raise SweepFailed(f"all {len(result.trials)} trials failed; first reason: {result.trials[0].reason}", result)
    return result
