"""Every GPU figure of issue 11 in one command: one table, one JSON file.

    python benchmarks/gpu_suite.py --device cuda --out gpu.json      # about 5 minutes on an H200 (estimate)
    python benchmarks/gpu_suite.py --device cpu --quick              # a smoke run of every part

Parts, each measured by the benchmark script that owns it:
  throughput  train_throughput.measure on exp12: the reference loop, the engine at batch 64 and at
              fast.yaml's batch, each with and without CUDA graphs
  fast        time_to_accuracy.measure on configs/fast.yaml
  best        time_to_accuracy.measure on configs/best.yaml, once per seed: mean ± std
  packing     sweep_throughput.throughput: exp12 trials with one worker, then with the number
              search.parallel: auto picks from free GPU memory
  fmnist_run  wall time of `fmnist run configs/exp12.yaml` (one trial) in a subprocess
--quick shrinks every part (2,000 training images, 32 filters, one epoch, one seed) to check
the suite itself; its figures are not comparable with the targets. Needs only torch, numpy and
pyyaml; a part that needs more (fmnist run needs mlflow and hyperopt) is skipped, saying why.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
sys.path.insert(0, str(BENCHMARKS))
sys.path.insert(0, str(ROOT / "src"))

import sweep_throughput
import time_to_accuracy
import train_throughput

from fmnist_hpo.config.loading import load, to_dict
from fmnist_hpo.data.loading import load_dataset
from fmnist_hpo.search.packing import free_gpu_bytes, resolve_parallel, trial_footprint
from fmnist_hpo.training.device import resolve_device

EXP12, FAST, BEST = (str(ROOT / "configs" / name) for name in ("exp12.yaml", "fast.yaml", "best.yaml"))
QUICK = ["data.train_subset=2000", "data.val_size=2000", "model.filters=32", "train.epochs=1"]
Row = tuple[str, str, str]  # (figure, measured, target)


def part_throughput(args: argparse.Namespace, device: torch.device) -> tuple[dict, list[Row]]:
    cfg = load(EXP12, ["search.space={}", *args.shrink])
    fast_batch = load(FAST).train.batch_size
    modes = ["reference", "engine64", "engine64+graphs", "enginefast", "enginefast+graphs"]
    result = train_throughput.measure(cfg, device, modes, args.rounds, fast_batch)
    by_mode = {r["mode"]: r for r in result["results"]}
    targets = {"engine64+graphs": ">= 3x reference, <= 1.0 s", "enginefast+graphs": "<= 0.5 s"}
    rows = [(f"exp12 epoch, {mode}" + (f" (batch {fast_batch})" if mode.startswith("enginefast") else ""),
             f"{r['seconds_per_epoch']:.2f} s ({r['speedup_vs_reference']:.2f}x)", targets.get(mode, ""))
            for mode, r in by_mode.items()]
    return result, rows


def part_fast(args: argparse.Namespace, device: torch.device) -> tuple[dict, list[Row]]:
    result = time_to_accuracy.measure(load(FAST, args.shrink), device)
    reached = result["reached_seconds"]["0.935"]
    return result, [
        ("fast.yaml: training seconds to 93.5% test", f"{reached:.1f} s" if reached is not None else "not reached",
         "<= 8 s"),
        ("fast.yaml: validation-selected test accuracy",
         f"{result['selected_test_accuracy']:.2%} after {result['train_seconds']:.1f} s", ">= 93.5%"),
    ]


def part_best(args: argparse.Namespace, device: torch.device) -> tuple[dict, list[Row]]:
    base = load(BEST, args.shrink)
    runs = [time_to_accuracy.measure(load(BEST, [*args.shrink, f"train.seed={base.train.seed + i}"]), device)
            for i in range(args.best_seeds)]
    accuracies = [r["selected_test_accuracy"] for r in runs]
    spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    seconds = statistics.mean(r["train_seconds"] for r in runs)
    return {"runs": runs, "test_accuracies": accuracies}, [
        (f"best.yaml: test accuracy, mean ± std of {len(runs)} seed(s)",
         f"{statistics.mean(accuracies):.2%} ± {spread:.2%} ({seconds:.0f} s each)", ">= 94.5%"),
    ]


def part_packing(args: argparse.Namespace, device: torch.device) -> tuple[dict, list[Row]]:
    cfg = load(EXP12, [f"train.epochs={1 if args.quick else 2}", *args.shrink])
    raw = to_dict(cfg)
    space = raw["search"].pop("space")
    raw["search"]["space"] = {}
    # quick: the base config only, since exp12's space would bring back its full widths
    points = [{}] * args.trials if args.quick else sweep_throughput.sample_points(space, args.trials, seed=0)
    if device.type == "cuda":
        footprint = trial_footprint(cfg, device, load_dataset(cfg.data))
        auto, note = resolve_parallel("auto", device, footprint, free_gpu_bytes(device), ray_available=True,
                                      gpu_count=1)
    else:
        auto, note = resolve_parallel("auto", device)
    rates = {1: sweep_throughput.throughput(raw, points, 1, str(device))}
    if auto > 1:
        rates[auto] = sweep_throughput.throughput(raw, points, auto, str(device))
    gain = rates[auto] / rates[1]
    return {"auto": auto, "note": note, "trials_per_hour": rates}, [
        ("sweep: exp12 trials/hour, parallel 1", f"{rates[1]:.0f}", ""),
        (f"sweep: trials/hour, parallel auto (= {auto})", f"{rates[auto]:.0f} ({gain:.2f}x)", "> 1x on a GPU"),
    ]


def part_fmnist_run(args: argparse.Namespace, device: torch.device) -> tuple[dict, list[Row]]:
    missing = [m for m in ("mlflow", "hyperopt", "typer") if importlib.util.find_spec(m) is None]
    if missing:
        raise Skipped(f"needs {', '.join(missing)} (pip install -e .)")
    epochs = 1 if args.quick else args.run_epochs
    with tempfile.TemporaryDirectory() as scratch:
        overrides = ["search.space={}", f"train.epochs={epochs}", f"mlflow.tracking_uri=sqlite:///{scratch}/mlflow.db",
                     f"models_dir={scratch}/models", *args.shrink]
        command = [sys.executable, "-m", "fmnist_hpo", "run", EXP12, "--device", device.type, "--fresh", "-q",
                   *(a for o in overrides for a in ("--set", o))]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
        start = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"fmnist run exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    return {"epochs": epochs, "wall_seconds": wall}, [
        (f"fmnist run exp12, one trial of {epochs} epoch(s): wall", f"{wall:.1f} s ({wall / epochs:.2f} s/epoch)",
         "per epoch ~ benchmark"),
    ]


class Skipped(Exception):
    """A part that cannot run on this machine."""


PARTS: dict[str, Callable[[argparse.Namespace, torch.device], tuple[dict, list[Row]]]] = {
    "throughput": part_throughput, "fast": part_fast, "best": part_best, "packing": part_packing,
    "fmnist_run": part_fmnist_run,
}


def run_parts(args: argparse.Namespace, device: torch.device) -> tuple[dict[str, Any], list[Row]]:
    report: dict[str, Any] = {}
    rows: list[Row] = []
    for name in args.parts.split(","):
        start = time.perf_counter()
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        try:
            result, part_rows = PARTS[name](args, device)
        except Skipped as why:
            result, part_rows = {"skipped": str(why)}, [(name, "skipped", str(why))]
        result["suite_seconds"] = time.perf_counter() - start
        report[name] = result
        rows += part_rows
    return report, rows


def table(rows: list[Row]) -> str:
    width = max(len(r[0]) for r in rows)
    value = max(len(r[1]) for r in rows)
    lines = [f"{'figure':<{width}}  {'measured':<{value}}  target", "-" * (width + value + 12)]
    lines += [f"{figure:<{width}}  {measured:<{value}}  {target}" for figure, measured, target in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks the suite, not the targets")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--rounds", type=int, default=None, help="throughput epochs per mode (default 2, quick 1)")
    parser.add_argument("--best-seeds", type=int, default=None, help="best.yaml seeds (default 3, quick 1)")
    parser.add_argument("--trials", type=int, default=None, help="exp12 trials per packing measurement (default 8)")
    parser.add_argument("--run-epochs", type=int, default=5, help="epochs of the fmnist run trial")
    parser.add_argument("--out", type=Path, default=None, help="write every figure as JSON here")
    args = parser.parse_args()
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    args.shrink = QUICK if args.quick else []
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.best_seeds = args.best_seeds or (1 if args.quick else 3)
    args.trials = args.trials or (2 if args.quick else 8)

    device = resolve_device(args.device)
    start = time.perf_counter()
    report, rows = run_parts(args, device)
    machine = train_throughput.machine(device)
    print(f"gpu_suite on {machine}, torch {torch.__version__}{' (--quick)' if args.quick else ''}: "
          f"{time.perf_counter() - start:.0f} s")
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps({"machine": machine, "device": str(device), "torch": torch.__version__,
                                        "quick": args.quick, "date": time.strftime("%Y-%m-%d"),
                                        "seconds": time.perf_counter() - start, "parts": report,
                                        "table": [list(r) for r in rows]}, indent=2))


if __name__ == "__main__":
    main()
