"""Parallel sweeps on Ray Tune: the same space, metric and seed through Ray's HyperOptSearch.

Workers only train: each epoch they report metrics and a checkpoint of the whole training state
to Tune. Only the driver writes to MLflow (a Tune callback feeding trial_runs.SweepRuns, as the
sequential engine does), so one SQLite file never has two writers, and `fmnist analyze` cannot
tell this engine from the sequential one. A configuration Hyperopt proposes again is answered
from its stored result (DistinctSearcher), so num_samples counts distinct configurations.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fmnist_hpo.config.loading import apply_overrides, to_dict
from fmnist_hpo.config.sections import Config, validate
from fmnist_hpo.config.space import (
    MAX_REPEATED_PROPOSALS,
    config_key,
    plain_values,
    planned_points,
)
from fmnist_hpo.errors import FmnistError, Terminated
from fmnist_hpo.files import atomic_write, models_folder
from fmnist_hpo.records import (
    EPOCH_METRICS,
    EPOCH_TIMINGS,
    FINAL_METRICS,
    EpochMetrics,
    LoggedTrial,
    SweepResult,
    TrialRecord,
    TrialStatus,
)
from fmnist_hpo.search.hyperopt_space import add_to_history, to_hyperopt
from fmnist_hpo.search.strategy import Trained, exhausted_note
from fmnist_hpo.selection import kept_epoch, objective
from fmnist_hpo.tags import RAY_TRIAL_ID
from fmnist_hpo.training.hooks import FitHooks

if TYPE_CHECKING:
    from fmnist_hpo.data.loading import Dataset
    from fmnist_hpo.search.progress import SweepProgress
    from fmnist_hpo.search.trial_runs import SweepRuns

MODEL_FILE = "model.pt"


class RayUnavailable(FmnistError):
    """Ray is not installed, or the cluster cannot be reached."""


def ray_trial(params: dict[str, Any], base: dict[str, Any], dataset: Dataset) -> None:
    """One trial inside a Ray worker: train, report every epoch, report the final model."""
    from ray import tune

    from fmnist_hpo.data.datasets import dataset_named
    from fmnist_hpo.data.splits import make_splits
    from fmnist_hpo.training.checkpoints import save_checkpoint
    from fmnist_hpo.training.device import resolve_device
    from fmnist_hpo.training.loop import train_and_test

    cfg = validate(apply_overrides(base, plain_values(params)))
    device = resolve_device(cfg.train.device)
    splits = make_splits(dataset, cfg.data, device)
    reports = ReportToTune(cfg.search.metric)
    outcome = train_and_test(cfg, splits, device, reports)
    record = TrialRecord(-1, "", {})
    outcome.record_into(record)
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(Path(folder) / MODEL_FILE, outcome.model, to_dict(cfg)["model"],
                        dataset_named(cfg.data.dataset), kept_epoch=record.kept_epoch)
        tune.report({"final": 1, "objective": reports.best, **{k: getattr(record, k) for k in FINAL_METRICS}},
                    checkpoint=tune.Checkpoint.from_directory(folder))


class ReportToTune(FitHooks):
    """Every epoch's metrics to Tune, with the objective so far: the kept epoch's, which schedulers compare.

    No training state travels with a report: a cut-off trial is rerun from the start, never restored.
    """

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.best = math.inf

    def epoch_done(self, metrics: EpochMetrics, state: Callable[[], dict[str, Any]]) -> None:
        from ray import tune

        self.best = min(self.best, objective(self.metric, metrics.val_loss, metrics.val_accuracy))
        tune.report({**metrics.as_dict(), "epoch": metrics.epoch, "objective": self.best})


def trial_resources(parallel: int, gpus_per_trial: float | None) -> dict[str, float]:
    """Each trial's share of the cluster's GPUs (not the driver's: on a remote cluster it may have none)."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else torch.cuda.device_count()
    share = gpus_per_trial if gpus_per_trial is not None else (min(1.0, gpus / parallel) if gpus else 0.0)
    return {"cpu": max(1, (os.cpu_count() or 1) // parallel), "gpu": share}


def start_ray(address: str | None) -> None:
    try:
        import ray
    except ImportError:
        raise RayUnavailable("search.parallel > 1 runs on Ray Tune, which is not installed: "
                             "pip install 'fmnist-hpo[ray]'") from None
    if ray.is_initialized():
        return
    import logging

    try:
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayUnavailable(f"cannot start or reach Ray at {address or 'a local instance'}: {exc}") from None


def run_on_ray(runs: SweepRuns, result: SweepResult, progress: SweepProgress, dataset: Dataset,
               cut_off: list[LoggedTrial], parallel: int) -> None:
    """Run the remaining configurations of the sweep on Ray Tune, parallel at once, logging each through runs."""
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # our handler below, not Tune's, decides what Ctrl-C means
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    cfg = runs.cfg
    search = cfg.search
    start_ray(search.ray_address)
    from ray import tune

    for trial in cut_off:  # Ray trials cut off by an interruption: closed, their configurations run again
        runs.close_cut_off(trial)
    remaining = planned_points(search.space, search.algo, search.max_evals) - len(result.trials)
    if remaining <= 0:
        return
    storage = (models_folder(cfg.models_dir, cfg.experiment) / "ray").absolute()
    name = f"sweep-{result.parent_run_id}"
    trainable = tune.with_resources(
        tune.with_parameters(ray_trial, base=to_dict(cfg), dataset=dataset),
        trial_resources(parallel, search.gpus_per_trial),
    )
    interrupt = Interrupt()
    callback = mlflow_feed(runs, result, progress, interrupt)
    searcher = distinct_searcher(cfg, result, cut_off)
    tuner = tune.Tuner(trainable, tune_config=tune_config(cfg, searcher, remaining, parallel),
                       run_config=tune.RunConfig(name=name, storage_path=str(storage), callbacks=[callback],
                                                 stop=interrupt.stopper(), verbose=0,
                                                 checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
    with interrupt.catching():
        tuner.fit()
    interrupt.raise_if_set()
    if searcher.exhausted:
        result.note = exhausted_note(search.algo, MAX_REPEATED_PROPOSALS, len(result.trials), search.max_evals)
    shutil.rmtree(storage / name, ignore_errors=True)  # finished: the MLflow runs and models/ hold everything


class Interrupt:
    """Ctrl-C or SIGTERM during a Ray sweep: stop Tune cleanly, then unwind like the sequential engine.

    Raising inside Tune's loop can be swallowed there, so the signal only sets a flag; a Tune stopper
    ends every trial, the callback leaves the cut-off trials open (the sweep marks them KILLED), and
    the exception is raised once Tune has returned. A second Ctrl-C raises at once.
    """

    def __init__(self) -> None:
        self.signal: int | None = None

    def handle(self, signum: int, frame: object) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    @contextlib.contextmanager
    def catching(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def stopper(self) -> Any:
        from ray.tune.stopper import Stopper

        interrupt = self

        class StopOnInterrupt(Stopper):
            def __call__(self, trial_id: str, result: dict) -> bool:
                return interrupt.signal is not None

            def stop_all(self) -> bool:
                return interrupt.signal is not None

        return StopOnInterrupt()

    def raise_if_set(self) -> None:
        if self.signal == signal.SIGTERM:
            raise Terminated()
        if self.signal is not None:
            raise KeyboardInterrupt


def distinct_searcher(cfg: Config, result: SweepResult, cut_off: list[LoggedTrial]) -> Any:
    """Ray's HyperOptSearch on the sweep's space, seeded, told the results so far, proposing the
    configurations an interruption cut off first, and only configurations not trained yet."""
    from ray.tune.search.hyperopt import HyperOptSearch

    search = cfg.search
    startup = search.max_evals if search.algo == "random" else 20  # Hyperopt's own TPE start-up length
    done = result.trials  # before an interruption: TPE learns from them; a new seed avoids repeating points
    rerun = list({config_key(t.values): t.values for t in cut_off}.values())
    inner = HyperOptSearch(to_hyperopt(search.space), metric="objective", mode="min",
                           random_state_seed=search.seed + 7919 * len(done), n_initial_points=startup,
                           points_to_evaluate=rerun or None)
    trained = Trained()
    for trial in done:  # HyperOptSearch built its Hyperopt Trials when given the space; extend them
        loss = trial.objective(search.metric) if trial.status == TrialStatus.OK else None
        add_to_history(inner._hpopt_trials, search.space, trial.values, loss)
        trained.record(trial.values, loss)
    inner._hpopt_trials.refresh()
    return distinct(inner, trained)


def distinct(inner: Any, trained: Trained) -> Any:
    """inner wrapped so that a configuration already trained (or training) is never proposed to Tune.

    One training is recorded with no loss until it completes: a twin proposed meanwhile is dropped.
    """
    from ray.tune.search import Searcher

    class DistinctSearcher(Searcher):
        def __init__(self) -> None:
            super().__init__(metric="objective", mode="min")
            self.exhausted = False
            self.live: dict[str, tuple[str, dict[str, Any]]] = {}  # Tune trial id -> (inner trial id, values)
            self.asked = 0

        def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
            return inner.set_search_properties(metric, mode, config, **spec)

        def suggest(self, trial_id: str) -> dict | str | None:
            for _ in range(MAX_REPEATED_PROPOSALS):
                self.asked += 1
                inner_id = f"{trial_id}-{self.asked}"
                proposal = inner.suggest(inner_id)
                if proposal is None or proposal == Searcher.FINISHED:
                    return proposal
                values = plain_values(proposal)
                if trained.is_new(values):
                    trained.record(values, None)
                    self.live[trial_id] = (inner_id, values)
                    return proposal
                loss = trained.loss(values)  # answered from the stored result; a twin still training is dropped
                inner.on_trial_complete(inner_id, {"objective": loss} if loss is not None else None, error=loss is None)
            self.exhausted = True
            return Searcher.FINISHED

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if trial_id in self.live:
                inner.on_trial_result(self.live[trial_id][0], result)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if trial_id not in self.live:
                return
            inner_id, values = self.live.pop(trial_id)
            trained.record(values, None if error or not result else result.get("objective"))
            inner.on_trial_complete(inner_id, result, error)

        def save(self, checkpoint_path: str) -> None:
            inner.save(checkpoint_path)

        def restore(self, checkpoint_path: str) -> None:
            inner.restore(checkpoint_path)

    return DistinctSearcher()


def tune_config(cfg: Config, searcher: Any, num_samples: int, parallel: int) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule
    from ray.tune.search import ConcurrencyLimiter

    search = cfg.search
    scheduler = None
    if search.pruner == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", metric="objective", mode="min",
                                  grace_period=search.grace_epochs, max_t=cfg.train.epochs + 1)
    elif search.pruner == "median":
        scheduler = MedianStoppingRule(time_attr="training_iteration", metric="objective", mode="min",
                                       grace_period=search.grace_epochs, min_samples_required=2)
    return tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, max_concurrent=parallel),
                           scheduler=scheduler, num_samples=num_samples)


def mlflow_feed(runs: SweepRuns, result: SweepResult, progress: SweepProgress, interrupt: Interrupt) -> Any:
    """The driver's Tune callback; its class is made here so that importing this module needs no Ray."""
    from ray import tune

    class MlflowFeed(_Feed, tune.Callback):
        pass

    return MlflowFeed(runs, result, progress, interrupt)


class _Feed:
    def __init__(self, runs: SweepRuns, result: SweepResult, progress: SweepProgress, interrupt: Interrupt) -> None:
        self.interrupt = interrupt
        self.runs = runs
        self.result = result
        self.progress = progress
        self.records: dict[str, TrialRecord] = {}
        self.finals: dict[str, dict[str, Any]] = {}
        self.histories: dict[str, list[EpochMetrics]] = {}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id not in self.records:
            values = plain_values(trial.config)
            self.records[trial.trial_id] = self.runs.open_trial(None, values, tags={RAY_TRIAL_ID: trial.trial_id})
            self.histories[trial.trial_id] = []
            self.progress.trial_started(self.records[trial.trial_id].number, values)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        record = self.records[trial.trial_id]
        if result.get("final"):
            self.finals[trial.trial_id] = result
            return
        metrics = EpochMetrics(int(result["epoch"]), **{k: float(result[k]) for k in EPOCH_METRICS},
                               **{k: float(result[k]) for k in EPOCH_TIMINGS if k in result})
        self.histories[trial.trial_id].append(metrics)
        self.runs.log_epoch(record, metrics)
        self.progress.epoch_done(record.number, metrics)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        record = self.records[trial.trial_id]
        final = self.finals.get(trial.trial_id)
        if final is None and self.interrupt.signal is not None:
            return  # cut off by Ctrl-C/SIGTERM: the run stays open and the sweep marks it KILLED
        if final is None:  # stopped by the scheduler (ASHA, median): its kept epoch so far, untested
            history = self.histories[trial.trial_id]
            if history:
                record.keep(history[kept_epoch(history, self.runs.cfg.search.metric)], history)
            record.pruned_at = history[-1].epoch + 1 if history else 0
        else:
            for key in FINAL_METRICS:
                setattr(record, key, type(getattr(record, key))(final[key]))
            with trial.checkpoint.as_directory() as folder:
                path = self.runs.checkpoint_path(record)
                atomic_write(path, lambda tmp: shutil.copyfile(Path(folder) / MODEL_FILE, tmp))
                record.checkpoint = path
        self.runs.close_finished(record)
        self._done(record)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        record = self.records.get(trial.trial_id)
        if record is not None:
            self.runs.close_failed(record, _error_of(trial))
            self._done(record)

    def _done(self, record: TrialRecord) -> None:
        self.result.trials.append(record)
        self.progress.trial_done(record)


def _error_of(trial: Any) -> str:
    """The last line of the exception a Ray trial died of."""
    text = ""
    error_file = getattr(trial, "error_file", None)
    if error_file and Path(error_file).is_file():
        text = Path(error_file).read_text(errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "Exception" in line or "Diverged" in line:
            return line[:500]
    return lines[-1][:500] if lines else "the trial failed in its Ray worker"
