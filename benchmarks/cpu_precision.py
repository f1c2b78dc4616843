"""`fmnist run` on a CPU with `train.precision: fp32` against `auto` (bf16 autocast where the CPU has
native bf16): wall time, validation accuracy and where a trial's time goes, modes interleaved.

    python benchmarks/cpu_precision.py --config configs/quick.yaml --rounds 2 --out cpu_precision.json
    python benchmarks/cpu_precision.py --config configs/quick.yaml --set search.max_evals=1   # one trial
    git worktree add /tmp/old a31bb89
    python benchmarks/cpu_precision.py --config configs/quick.yaml --against /tmp/old   # old code too

Each run is a fresh `fmnist run` process (so its wall time is what a user waits, imports and the
store included) into its own temporary MLflow store and models folder. Per trial it reads back the
epochs' seconds and the trial's wall time, so `outside epochs` is what a trial costs besides
training and validation (its run, params, dataset inputs, test pass, checkpoint, state files).
--against CHECKOUT runs both modes of that checkout's `src/` as well, interleaved with these.
Targets (issue 17): auto at least 1.8x faster than fp32, validation accuracy within 0.3 points.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from fmnist_hpo.config.loading import load
from fmnist_hpo.tags import ROLE, WALL_SECONDS, Role

MODES = ("fp32", "auto")
EVAL_BATCHES = 4


def one_run(spec: str, precision: str, overrides: list[str], source: Path = ROOT / "src") -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as folder:
        uri = f"sqlite:///{folder}/mlflow.db"
        command = [sys.executable, "-m", "fmnist_hpo", "run", spec, "--quiet", "--fresh", "--device", "cpu",
                   "--tracking-uri", uri, "--set", f"train.precision={precision}",
                   "--set", f"models_dir={folder}/models", *(a for o in overrides for a in ("--set", o))]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source), os.environ.get("PYTHONPATH", "")])}
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"fmnist run failed ({precision}):\n{done.stderr[-2000:]}")
        client = MlflowClient(uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        parent = next(r for r in runs if r.data.tags.get(ROLE) == Role.SWEEP)
        trials = []
        for run in (r for r in runs if r.data.tags.get(ROLE) == Role.TRIAL):
            epochs = sum(m.value for m in client.get_metric_history(run.info.run_id, "epoch_seconds"))
            trial_wall = float(run.data.tags[WALL_SECONDS])
            trials.append({"epochs_seconds": epochs, "wall_seconds": trial_wall, "outside_epochs": trial_wall - epochs,
                           "kept_val_accuracy": run.data.metrics.get("kept_val_accuracy")})
    return {"precision": precision, "wall_seconds": wall, "trials": trials,
            "selected_val_accuracy": parent.data.metrics.get("selected_val_accuracy"),
            "epochs_seconds": sum(t["epochs_seconds"] for t in trials),
            "outside_epochs": statistics.fmean(t["outside_epochs"] for t in trials)}


def interleaved_steps(config_path: str, overrides: list[str], blocks: int, steps: int) -> dict[str, Any]:
    """Seconds per training step and per evaluation batch of the config's model, fp32 against auto, in
    alternating blocks of `steps`: on a machine shared with other work both modes see the same load."""
    import torch

    from fmnist_hpo.data.splits import Split
    from fmnist_hpo.training.loop import evaluate, make_optimizer, prepare_trial

    cpu = torch.device("cpu")
    setups = {}
    for mode in MODES:
        cfg = load(config_path, [*overrides, f"train.precision={mode}", "train.device=cpu"])
        model, engine = prepare_trial(cfg, cpu)
        setups[mode] = (cfg, model, engine, make_optimizer(model, cfg.train, engine))
    batch, eval_batch = cfg.train.batch_size, cfg.train.eval_batch_size
    generator = torch.Generator().manual_seed(0)
    size = max(batch, EVAL_BATCHES * eval_batch)
    data = Split(torch.randint(0, 256, (size, 1, 28, 28), dtype=torch.uint8, generator=generator),
                 torch.randint(0, 10, (size,), generator=generator))
    eval_data = Split(data.images[:EVAL_BATCHES * eval_batch], data.labels[:EVAL_BATCHES * eval_batch])

    def train_block(mode: str) -> float:
        _, model, engine, optimizer = setups[mode]
        model.train()
        x, y = engine.inputs(data.images[:batch]), data.labels[:batch]
        start = time.perf_counter()
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            with engine.autocast():
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
        return (time.perf_counter() - start) / steps

    def eval_block(mode: str) -> float:
        """One evaluation batch as a trial scores it: evaluate() over EVAL_BATCHES batches (on CPU it folds
        BatchNorm into the layers first, once per call, as once per validation pass)."""
        _, model, engine, _ = setups[mode]
        start = time.perf_counter()
        for _ in range(steps):
            evaluate(model, eval_data, engine, eval_batch)
        return (time.perf_counter() - start) / (steps * EVAL_BATCHES)

    seconds: dict[str, dict[str, list[float]]] = {kind: {m: [] for m in MODES} for kind in ("train", "eval")}
    for block in range(blocks + 1):  # the first block of each is a warm-up
        for mode in (MODES if block % 2 == 0 else MODES[::-1]):
            train_seconds, eval_seconds = train_block(mode), eval_block(mode)
            if block:
                seconds["train"][mode].append(train_seconds)
                seconds["eval"][mode].append(eval_seconds)
    return {kind: {m: statistics.median(v) for m, v in by_mode.items()} for kind, by_mode in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "quick.yaml"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE for both modes")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--against", type=Path, metavar="CHECKOUT", help="also run this checkout's src/ (older code)")
    parser.add_argument("--steps-only", action="store_true",
                        help="only the interleaved step timing (seconds, where whole runs take minutes)")
    args = parser.parse_args()
    from fmnist_hpo.training.device import cpu_has_native_bf16

    steps = interleaved_steps(args.config, args.overrides, blocks=10, steps=10)
    print(f"native bf16 on this CPU: {cpu_has_native_bf16()}  ({os.cpu_count()} cores)")
    for kind in ("train", "eval"):
        fp32, auto = steps[kind]["fp32"], steps[kind]["auto"]
        print(f"{kind} step: fp32 {1000 * fp32:.1f} ms, auto {1000 * auto:.1f} ms: {fp32 / auto:.2f}x")
    if args.steps_only:
        return

    sources = {"": ROOT / "src"} | ({f" ({args.against.name})": args.against / "src"} if args.against else {})
    cells = [(mode, label) for label in sources for mode in MODES]
    runs: dict[str, list[dict]] = {mode + label: [] for mode, label in cells}
    for round_number in range(args.rounds):
        for mode, label in (cells if round_number % 2 == 0 else cells[::-1]):  # none always runs first
            runs[mode + label].append(one_run(args.config, mode, args.overrides, sources[label]))
            last = runs[mode + label][-1]
            print(f"round {round_number + 1} {mode + label}: {last['wall_seconds']:.1f} s, epochs "
                  f"{last['epochs_seconds']:.1f} s, outside epochs {last['outside_epochs']:.2f} s per trial, "
                  f"val acc {last['selected_val_accuracy']:.4f}", file=sys.stderr, flush=True)
    median = {cell: {key: statistics.median(r[key] for r in cell_runs)
                     for key in ("wall_seconds", "epochs_seconds", "outside_epochs", "selected_val_accuracy")}
              for cell, cell_runs in runs.items()}
    print(f"{'precision':<24}{'wall s':>9}{'epochs s':>10}{'outside/trial s':>17}{'val acc':>9}")
    for cell, m in median.items():
        print(f"{cell:<24}{m['wall_seconds']:>9.1f}{m['epochs_seconds']:>10.1f}{m['outside_epochs']:>17.2f}"
              f"{m['selected_val_accuracy']:>9.4f}")
    speedup = median["fp32"]["wall_seconds"] / median["auto"]["wall_seconds"]
    epochs_speedup = median["fp32"]["epochs_seconds"] / median["auto"]["epochs_seconds"]
    points = 100 * (median["auto"]["selected_val_accuracy"] - median["fp32"]["selected_val_accuracy"])
    print(f"auto vs fp32: wall {speedup:.2f}x (target 1.8x), epochs {epochs_speedup:.2f}x, "
          f"val accuracy {points:+.2f} points (target within 0.3)")
    if args.out:
        args.out.write_text(json.dumps({"config": args.config, "overrides": args.overrides, "date": time.strftime("%Y-%m-%d"),
                                        "native_bf16": cpu_has_native_bf16(), "steps": steps, "runs": runs, "median": median,
                                        "wall_speedup": speedup, "epochs_speedup": epochs_speedup,
                                        "val_accuracy_points": points}, indent=2))


if __name__ == "__main__":
    main()
