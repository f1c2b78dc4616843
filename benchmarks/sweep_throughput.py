"""Trials per hour with several trials at once on one device, and what median pruning saves.

    python benchmarks/sweep_throughput.py --config configs/exp12.yaml --device cuda --trials 8 --epochs 2 --parallel 1,2,4,8
    python benchmarks/sweep_throughput.py --config configs/exp12.yaml --device cuda --pruning --trials 12 --epochs 40

Throughput: the same sampled configurations trained by N worker processes sharing the device (what
the Ray engine does with fractional GPUs, without Ray's scheduling on top). Pruning: the same
configurations trained one after another with and without the median pruner; wall time and the
validation-selected trial's test accuracy. Needs only torch, numpy and pyyaml.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fmnist_hpo.config.loading import apply_overrides, load, to_dict
from fmnist_hpo.config.sections import validate
from fmnist_hpo.config.space import parse_entry
from fmnist_hpo.data.loading import load_dataset
from fmnist_hpo.data.splits import make_splits
from fmnist_hpo.records import EpochMetrics
from fmnist_hpo.search.pruning import MedianPruner, best_so_far
from fmnist_hpo.training.device import resolve_device
from fmnist_hpo.training.hooks import FitHooks
from fmnist_hpo.training.loop import train_and_test

_worker: dict[str, Any] = {}


def sample_points(space: dict[str, dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    """n random points of a YAML space (the benchmark needs fixed points, not a search)."""
    rng = np.random.default_rng(seed)
    points = []
    for _ in range(n):
        point = {}
        for key, spec in space.items():
            kind, args = parse_entry(key, spec)
            if kind == "choice":
                value = args[rng.integers(len(args))]
            elif kind == "randint":
                value = int(rng.integers(int(args[0]), int(args[1])))
            elif kind == "normal":
                value = float(rng.normal(args[0], args[1]))
            else:
                low, high = (math.log(args[0]), math.log(args[1])) if "log" in kind else (args[0], args[1])
                value = float(rng.uniform(low, high))
                value = math.exp(value) if "log" in kind else value
                value = round(value / args[2]) * args[2] if kind.startswith("q") else value
            point[key] = value
        points.append(point)
    return points


def _init_worker(raw: dict[str, Any], device: str, threads: int) -> None:
    torch.set_num_threads(threads)  # N CPU workers share the cores instead of oversubscribing them
    cfg = validate(raw)
    _worker.update(raw=raw, device=resolve_device(device), dataset=load_dataset(cfg.data))


def _train_point(point: dict[str, Any]) -> float:
    cfg = validate(apply_overrides(_worker["raw"], point))
    splits = make_splits(_worker["dataset"], cfg.data, _worker["device"])
    return train_and_test(cfg, splits, _worker["device"]).test_accuracy


def throughput(raw: dict[str, Any], points: list[dict[str, Any]], parallel: int, device: str) -> float:
    """Trials per hour with `parallel` worker processes (start-up and data loading excluded)."""
    context = multiprocessing.get_context("spawn")
    threads = max(1, (multiprocessing.cpu_count() or 1) // parallel)
    with ProcessPoolExecutor(parallel, mp_context=context, initializer=_init_worker,
                             initargs=(raw, device, threads)) as pool:
        list(pool.map(_train_point, [points[0]] * parallel))  # warm-up: imports, data, CUDA contexts
        start = time.perf_counter()
        list(pool.map(_train_point, points))
        seconds = time.perf_counter() - start
    return len(points) * 3600 / seconds


class AskPruner(FitHooks):
    """Each epoch's validation accuracy to the median pruner (None: never prune)."""

    def __init__(self, pruner: MedianPruner | None) -> None:
        self.pruner = pruner
        self.seen: list[float] = []

    def should_prune(self, metrics: EpochMetrics) -> bool:
        self.seen.append(-metrics.val_accuracy)
        return self.pruner is not None and self.pruner.should_prune(best_so_far(self.seen))


def pruning(raw: dict[str, Any], points: list[dict[str, Any]], device_name: str, grace: int) -> dict[str, Any]:
    device = resolve_device(device_name)
    dataset = load_dataset(validate(raw).data)
    outcome = {}
    for label, pruner in (("no pruning", None), ("median pruning", MedianPruner(grace))):
        start = time.perf_counter()
        trials = []
        for point in points:
            cfg = validate(apply_overrides(raw, point))
            asked = AskPruner(pruner)
            result = train_and_test(cfg, make_splits(dataset, cfg.data, device), device, asked)
            if pruner is not None:
                pruner.record(best_so_far(asked.seen))
            trials.append((result.fit.kept.val_accuracy, result.test_accuracy, result.fit.pruned_at is not None))
        best = max(trials)
        outcome[label] = {"wall_seconds": time.perf_counter() - start, "best_val_accuracy": best[0],
                          "best_test_accuracy": best[1], "pruned": sum(t[2] for t in trials)}
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/exp12.yaml")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--parallel", default="1,2,4,8")
    parser.add_argument("--pruning", action="store_true", help="compare wall time with and without median pruning")
    parser.add_argument("--grace", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key=value, repeatable")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    cfg = load(args.config, [f"train.epochs={args.epochs}", *args.overrides])
    raw = to_dict(cfg)
    space = raw["search"].pop("space")
    raw["search"]["space"] = {}
    points = sample_points(space, args.trials, args.seed)
    report: dict[str, Any] = {"config": args.config, "device": args.device, "trials": args.trials,
                              "epochs": args.epochs, "date": time.strftime("%Y-%m-%d")}
    if args.pruning:
        report["pruning"] = pruning(raw, points, args.device, args.grace)
        base, pruned = report["pruning"]["no pruning"], report["pruning"]["median pruning"]
        for label, row in report["pruning"].items():
            print(f"{label:<16} {row['wall_seconds']:8.1f} s  best val {row['best_val_accuracy']:.4f}  "
                  f"its test {row['best_test_accuracy']:.4f}  pruned {row['pruned']}")
        print(f"wall time saved: {1 - pruned['wall_seconds'] / base['wall_seconds']:.1%}; test accuracy change "
              f"{(pruned['best_test_accuracy'] - base['best_test_accuracy']) * 100:+.2f} points")
    else:
        rates = {int(p): throughput(raw, points, int(p), args.device) for p in args.parallel.split(",")}
        report["trials_per_hour"] = rates
        for p, rate in rates.items():
            print(f"parallel {p}: {rate:8.1f} trials/hour  ({rate / rates[min(rates)]:.2f}x)")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
