"""Training seconds until the full 10,000-image test set first reaches 93.0%, 93.5% and 94.0%.

    python benchmarks/time_to_accuracy.py --config configs/fast.yaml --device cuda

The test set is scored after every epoch for this report only (outside the timed training, and
never used to pick anything); the last line is the honest number: the test accuracy of the
checkpoint the validation split picked. Needs only torch, numpy and pyyaml.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fmnist_hpo.config.loading import load
from fmnist_hpo.config.sections import Config
from fmnist_hpo.data.loading import load_dataset
from fmnist_hpo.data.splits import make_splits
from fmnist_hpo.records import EpochMetrics
from fmnist_hpo.training.device import resolve_device
from fmnist_hpo.training.hooks import FitHooks
from fmnist_hpo.training.loop import evaluate, fit, prepare_trial

THRESHOLDS = (0.930, 0.935, 0.940)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/fast.yaml")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key=value, repeatable")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    cfg = load(args.config, ["search.space={}", *args.overrides])
    result = measure(cfg, resolve_device(args.device), verbose=True)
    for threshold, seconds in result["reached_seconds"].items():
        print(f"test >= {float(threshold):.1%}: " + (f"{seconds:.1f} s of training" if seconds is not None else "not reached"))
    print(f"validation-selected checkpoint (epoch {result['selected_epoch']}): test {result['selected_test_accuracy']:.4f} "
          f"after {result['train_seconds']:.1f} s of training")
    if args.out:
        args.out.write_text(json.dumps({"config": args.config, **result}, indent=2))


def measure(cfg: Config, device: torch.device, verbose: bool = False) -> dict:
    """Train cfg once; the curve, the seconds to each threshold and the selected checkpoint's test score."""
    splits = make_splits(load_dataset(cfg.data), cfg.data, device)
    model, engine = prepare_trial(cfg, device)
    curve: list[dict[str, float]] = []

    class TestEveryEpoch(FitHooks):
        elapsed = 0.0

        def epoch_done(self, m: EpochMetrics, state: Callable[[], dict]) -> None:
            self.elapsed += m.epoch_seconds
            _, test_acc = evaluate(model, splits.test, engine, cfg.train.eval_batch_size)
            curve.append({"epoch": m.epoch, "train_seconds": self.elapsed, "val_accuracy": m.val_accuracy,
                          "test_accuracy": test_acc})
            if verbose:
                print(f"epoch {m.epoch:3d}  {self.elapsed:7.1f}s  val {m.val_accuracy:.4f}  test {test_acc:.4f}", flush=True)

    try:
        result = fit(model, splits, cfg, engine, TestEveryEpoch())
        _, selected_test = evaluate(model, splits.test, engine, cfg.train.eval_batch_size)
    finally:
        engine.release_graphs()  # the next seed's capture must not meet this one's graphs in the collector
    reached = {f"{t:.3f}": next((c["train_seconds"] for c in curve if c["test_accuracy"] >= t), None) for t in THRESHOLDS}
    return {"device": str(device), "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "date": time.strftime("%Y-%m-%d"), "reached_seconds": reached, "curve": curve,
            "selected_epoch": result.kept_epoch, "selected_test_accuracy": selected_test,
            "train_seconds": result.train_seconds}


if __name__ == "__main__":
    main()
