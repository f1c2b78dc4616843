"""Where a trial's time goes outside its epochs: one sweep in this process, with the sweep's steps timed.

    python benchmarks/trial_overhead.py --config configs/quick.yaml --trials 3
    python benchmarks/trial_overhead.py --config configs/quick.yaml --trials 3 --profile overhead.prof

A trial's wall time (Sweep.run_trial, from opening its run to closing it) minus its epochs' seconds
(training and validation, as logged) is its overhead: the MLflow run and its params, tags and dataset
inputs, the config artifact, the per-epoch metrics and state file, the model build, the test pass, the
checkpoint and its artifact, the closing metrics. Each of those is timed by wrapping the function that
does it; --profile writes a cProfile of the whole sweep as well. Epochs are cut to --epochs (default 1)
and the training split to --train-images, since only what surrounds them is measured here.
Needs what `fmnist run` needs (mlflow, hyperopt).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from fmnist_hpo.config.loading import load
from fmnist_hpo.search import (
    sweep,
    trial_runs,
)
from fmnist_hpo.search.resume import ResumeMode
from fmnist_hpo.tracking import writer
from fmnist_hpo.training import loop

# (module or class, attribute, label): what is timed, and the name it is reported under
TIMED = [
    (trial_runs.SweepRuns, "open_trial", "open run: create, params, tags"),
    (trial_runs.SweepRuns, "_log_inputs", "  of which dataset inputs"),
    (trial_runs.SweepRuns, "describe_trial", "config tag and config.yaml artifact"),
    (trial_runs.SweepRuns, "log_epoch", "epoch metrics"),
    (trial_runs.SweepRuns, "log_bookkeeping", "bookkeeping metric"),
    (sweep, "save_training_state", "training-state file"),
    (loop, "prepare_trial", "model build"),
    (sweep, "save_checkpoint", "checkpoint file"),
    (trial_runs.SweepRuns, "close_finished", "close run: artifact, tags, metrics, end"),
    (writer.Tracker, "log_file", "  of which checkpoint artifact"),
    (sweep.SplitCache, "get", "splits on the device"),
]


class Clock:
    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = defaultdict(list)

    def wrap(self, owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label].append(time.perf_counter() - start)

        setattr(owner, name, timed)

    def wrap_test_pass(self) -> None:
        """train.evaluate runs validation inside the epochs and the test pass after them: time the latter."""
        original = loop.evaluate

        def timed(model: Any, split: Any, engine: Any, batch_size: int = 1024) -> Any:
            start = time.perf_counter()
            try:
                return original(model, split, engine, batch_size)
            finally:
                if len(split) == 10_000:
                    self.seconds["test pass"].append(time.perf_counter() - start)

        loop.evaluate = timed

    def wrap_epochs(self) -> None:
        """The seconds of every epoch, as the sweep logs them."""
        original = trial_runs.SweepRuns.log_epoch

        def logged(runs: Any, record: Any, metrics: Any) -> None:
            self.seconds["epochs"].append(metrics.epoch_seconds)
            original(runs, record, metrics)

        trial_runs.SweepRuns.log_epoch = logged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "quick.yaml"))
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--profile", type=Path, help="write a cProfile of the sweep here")
    args = parser.parse_args()
    clock = Clock()
    for owner, name, label in TIMED:
        clock.wrap(owner, name, label)
    clock.wrap(sweep.Sweep, "run_trial", "trial")
    clock.wrap_test_pass()
    clock.wrap_epochs()
    with tempfile.TemporaryDirectory() as folder:
        cfg = load(args.config, [f"search.max_evals={args.trials}", f"train.epochs={args.epochs}",
                                 f"data.train_subset={args.train_images}", "train.device=cpu",
                                 f"mlflow.tracking_uri=sqlite:///{folder}/mlflow.db", "mlflow.log_model=none",
                                 f"models_dir={folder}/models", *args.overrides])
        profiler = cProfile.Profile() if args.profile else None
        if profiler:
            profiler.enable()
        result = sweep.run_from_config(cfg, show_bars=False, mode=ResumeMode.FRESH)
        if profiler:
            profiler.disable()
            profiler.dump_stats(args.profile)
    trials = [t for t in result.trials if t.status == "ok"]
    walls = clock.seconds["trial"]
    epochs = sum(clock.seconds["epochs"]) / len(walls)
    print(f"{len(trials)} trials: wall {statistics.fmean(walls):.2f} s, epochs {epochs:.2f} s, "
          f"outside epochs {statistics.fmean(walls) - epochs:.2f} s per trial (mean)")
    print(f"trial wall seconds: {', '.join(f'{w:.2f}' for w in walls)}")
    print(f"{'per trial, mean':<44}{'seconds':>9}  each")
    for label in [label for _, _, label in TIMED] + ["test pass"]:
        values = clock.seconds.get(label, [])
        each = ", ".join(f"{v:.3f}" for v in values) if len(values) == len(walls) else ""
        print(f"{label:<44}{sum(values) / max(len(trials), 1):>9.3f}  {each}")


if __name__ == "__main__":
    main()
