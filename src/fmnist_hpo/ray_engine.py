"""Parallel sweeps on Ray Tune: the same space, metric and seed through Ray's HyperOptSearch.

Workers only train: each epoch they report metrics and a checkpoint of the whole training state
to Tune. Only the driver writes to MLflow (a Tune callback fed by those reports), so one SQLite
file never has two writers, and `fmnist analyze` cannot tell this engine from the sequential one.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fmnist_hpo import config as config_module
from fmnist_hpo.errors import FmnistError, Terminated

if TYPE_CHECKING:
    from fmnist_hpo.data import Dataset
    from fmnist_hpo.progress import SweepProgress
    from fmnist_hpo.sweep import Sweep, SweepResult

STATE_FILE = "state.pt"
MODEL_FILE = "model.pt"


class RayUnavailable(FmnistError):
    """Ray is not installed, or the cluster cannot be reached."""


def objective_of(metric: str, val_loss: float, val_accuracy: float) -> float:
    return val_loss if metric == "val_loss" else -val_accuracy


def ray_trial(params: dict[str, Any], base: dict[str, Any], dataset: Dataset) -> None:
    """One trial inside a Ray worker: train, report every epoch, report the final model."""
    from ray import tune

    from fmnist_hpo.checkpoints import read_training_state, save_checkpoint, save_training_state
    from fmnist_hpo.data import make_splits
    from fmnist_hpo.space import plain_values
    from fmnist_hpo.train import EpochMetrics, resolve_device, train_and_test

    cfg = config_module.validate(config_module.apply_overrides(base, plain_values(params)))
    device = resolve_device(cfg.train.device)
    splits = make_splits(dataset, cfg.data, device)
    restored = tune.get_checkpoint()
    resume = None
    if restored is not None:
        with restored.as_directory() as folder:
            resume = read_training_state(Path(folder) / STATE_FILE)
    best = min((objective_of(cfg.search.metric, m["val_loss"], m["val_accuracy"]) for m in resume["history"]),
               default=math.inf) if resume else math.inf
    pending: dict[str, Any] = {}

    def on_epoch(m: EpochMetrics) -> None:
        nonlocal best
        best = min(best, objective_of(cfg.search.metric, m.val_loss, m.val_accuracy))
        pending.update({**m.as_dict(), "epoch": m.epoch, "objective": best})

    def save_state(state: dict[str, Any]) -> None:  # called right after on_epoch: report both together
        with tempfile.TemporaryDirectory() as folder:
            save_training_state(Path(folder) / STATE_FILE, state)
            tune.report(dict(pending), checkpoint=tune.Checkpoint.from_directory(folder))

    outcome = train_and_test(cfg, splits, device, on_epoch, resume, save_state)
    chosen = outcome.fit.kept
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(Path(folder) / MODEL_FILE, outcome.model, config_module.to_dict(cfg)["model"],
                        best_epoch=outcome.fit.kept_epoch)
        tune.report({"final": 1, "objective": best, "best_train_accuracy": chosen.train_accuracy,
                     "best_val_accuracy": chosen.val_accuracy, "best_val_loss": chosen.val_loss,
                     "test_accuracy": outcome.test_accuracy, "test_loss": outcome.test_loss,
                     "total_parameters": outcome.total_parameters, "train_seconds": outcome.fit.train_seconds,
                     "epochs_run": len(outcome.fit.history), "best_epoch": outcome.fit.kept_epoch},
                    checkpoint=tune.Checkpoint.from_directory(folder))


def trial_resources(parallel: int, gpus_per_trial: float | None) -> dict[str, float]:
    gpus = torch.cuda.device_count()
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


def run_on_ray(sweep: Sweep, result: SweepResult, progress: SweepProgress, dataset: Dataset) -> None:
    """Run the remaining trials of sweep's search on Ray Tune, logging each through sweep's tracker."""
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # our handler below, not Tune's, decides what Ctrl-C means
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")  # experiment state saved often: resumable after kill -9
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    cfg = sweep.cfg
    search = cfg.search
    start_ray(search.ray_address)
    from ray import tune

    close_interrupted(sweep)
    remaining = search.max_evals - len(result.trials)
    if remaining <= 0:
        return
    storage = (Path(cfg.models_dir) / cfg.experiment / "ray").absolute()
    name = f"sweep-{result.parent_run_id}"
    trainable = tune.with_resources(
        tune.with_parameters(ray_trial, base=config_module.to_dict(cfg), dataset=dataset),
        trial_resources(search.parallel, search.gpus_per_trial),
    )
    interrupt = Interrupt()
    callback = mlflow_feed(sweep, result, progress, interrupt)
    tuner = tune.Tuner(trainable, tune_config=tune_config(cfg, result, remaining),
                       run_config=tune.RunConfig(name=name, storage_path=str(storage), callbacks=[callback],
                                                 stop=interrupt.stopper(), verbose=0,
                                                 checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
    with interrupt.catching():
        tuner.fit()
    interrupt.raise_if_set()
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


def close_interrupted(sweep: Sweep) -> None:
    """Ray trials cut off by an interruption are closed as FAILED and run again from the start."""
    for trial in sweep.interrupted.values():
        sweep.tracker.set_tags(trial.run_id, {"interrupted": "true",
                                              "failure_reason": "interrupted; its configuration is run again"})
        sweep.tracker.end_run(trial.run_id, "FAILED")
        sweep.abandoned.append(trial)
    sweep.interrupted.clear()


def tune_config(cfg: config_module.Config, result: SweepResult, num_samples: int) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.hyperopt import HyperOptSearch

    from fmnist_hpo.space import to_hyperopt
    from fmnist_hpo.sweep import add_to_history

    search = cfg.search
    startup = search.max_evals if search.algo == "random" else 20  # Hyperopt's own TPE start-up length
    done = result.trials  # before an interruption: TPE learns from them; a new seed avoids repeating points
    searcher = HyperOptSearch(to_hyperopt(search.space), metric="objective", mode="min",
                              random_state_seed=search.seed + 7919 * len(done), n_initial_points=startup)
    for trial in done:  # HyperOptSearch built its Hyperopt Trials when given the space; extend them
        loss = trial.objective(search.metric) if trial.status == "ok" else None
        add_to_history(searcher._hpopt_trials, search.space, trial.values, loss)
    searcher._hpopt_trials.refresh()
    scheduler = None
    if search.pruner == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", metric="objective", mode="min",
                                  grace_period=search.grace_epochs, max_t=cfg.train.epochs + 1)
    elif search.pruner == "median":
        scheduler = MedianStoppingRule(time_attr="training_iteration", metric="objective", mode="min",
                                       grace_period=search.grace_epochs, min_samples_required=2)
    return tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, max_concurrent=search.parallel),
                           scheduler=scheduler, num_samples=num_samples)


def mlflow_feed(sweep: Sweep, result: SweepResult, progress: SweepProgress, interrupt: Interrupt) -> Any:
    """The driver's Tune callback; its class is made here so that importing this module needs no Ray."""
    from ray import tune

    class MlflowFeed(_Feed, tune.Callback):
        pass

    return MlflowFeed(sweep, result, progress, interrupt)


class _Feed:
    def __init__(self, sweep: Sweep, result: SweepResult, progress: SweepProgress, interrupt: Interrupt) -> None:
        self.interrupt = interrupt
        self.sweep = sweep
        self.result = result
        self.progress = progress
        self.records: dict[str, Any] = {}
        self.finals: dict[str, dict[str, Any]] = {}
        self.histories: dict[str, list[Any]] = {}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from fmnist_hpo.space import plain_values

        if trial.trial_id not in self.records:
            self.records[trial.trial_id] = self.sweep.open_trial_run(plain_values(trial.config), self.result,
                                                                     self.progress, {"ray_trial_id": trial.trial_id})
            self.histories[trial.trial_id] = []

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        record = self.records[trial.trial_id]
        if result.get("final"):
            self.finals[trial.trial_id] = result
            return
        from fmnist_hpo.train import EpochMetrics

        metrics = EpochMetrics(int(result["epoch"]), *(float(result[k]) for k in (
            "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds")))
        self.histories[trial.trial_id].append(metrics)
        self.sweep.tracker.log_metrics(record.run_id, metrics.as_dict(), step=metrics.epoch)
        self.progress.epoch_done(record.number, metrics)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        record = self.records[trial.trial_id]
        final = self.finals.get(trial.trial_id)
        if final is None and self.interrupt.signal is not None:
            return  # cut off by Ctrl-C/SIGTERM: the run stays open and the sweep marks it KILLED
        if final is None:  # stopped by the scheduler (ASHA, median) before it finished
            self.sweep.close_pruned_run(record, self.histories[trial.trial_id], self.result, self.progress)
            return
        with trial.checkpoint.as_directory() as folder:
            self.sweep.close_trial_run(record, final, Path(folder) / MODEL_FILE, self.result, self.progress)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        record = self.records.get(trial.trial_id)
        if record is not None:
            self.sweep.fail_trial_run(record, _error_of(trial), self.result, self.progress)


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
