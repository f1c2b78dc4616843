"""Whether the CUDA-graph path is right on this machine: one command, one table, one JSON file.

    python benchmarks/gpu_check.py --json gpu_check.json       # on one GPU: every part (about 2-4 minutes)
    python benchmarks/gpu_check.py --device cpu --quick        # what runs without CUDA (tests/ runs this)

Each part runs in its own subprocess, so a part that crashes or poisons its process (a failed
capture can) cannot hide the others; the table says which passed, what each measured and against
what target. Parts:

  train_fp32       graphed vs eager training, fp32, deterministic kernels, 41 steps with a ragged last
                   batch: parameters within 1e-5 relative
  train_bf16       bf16 autocast + channels_last + augmentation + StepLR over 3 epochs, dropout on:
                   every epoch's training loss within 5%, identical learning rates
  eval             graphed vs eager evaluation, several batches and a padded, masked tail
  dropout_lr0      replays of one batch draw new dropout masks; lr 0 leaves the weights bitwise unchanged
  gc_three_trials  three trials in one process with a garbage collection forced inside every capture:
                   all graphed, no graph left alive after a trial, reserved memory not growing
  fallback_capture a capture that fails for real (a device sync inside it): one warning line, the trial
                   trains on eagerly, and the process is usable (stream, allocator, a new capture)
  fallback_replay  a graph that bakes in a value the eager step reads afresh: the first-replay check
                   catches it, one warning line, the trial trains on eagerly
  resume           a graphed trial with dropout stopped after epoch 1 and resumed through its state file
                   on disk matches the uninterrupted one
  packing          search.parallel auto's footprint estimate against what a real trial process holds
                   (CUDA only)

On CPU the graphed code runs through a stand-in for graphs.capturer (the seam every capture goes
through) that replays by running the captured step again: every line of the graphed path runs
except the CUDA calls themselves, so `--device cpu` checks this script and that bookkeeping, not
CUDA. Needs only torch, numpy and pyyaml (and this package, from src/).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from fmnist_hpo.config.loading import to_dict
from fmnist_hpo.config.sections import Config, validate
from fmnist_hpo.data.datasets import FASHION_MNIST
from fmnist_hpo.data.loading import Dataset
from fmnist_hpo.data.splits import Split, Splits, make_splits
from fmnist_hpo.records import EpochMetrics
from fmnist_hpo.search import packing
from fmnist_hpo.training import (
    graphs,
    loop,
)
from fmnist_hpo.training.checkpoints import read_training_state, save_training_state
from fmnist_hpo.training.hooks import FitHooks
from fmnist_hpo.training.loop import evaluate, fit, prepare_trial, train_and_test

PART_TIMEOUT = 150  # seconds; a part that takes longer is reported as timed out, the rest still run


# --- the CPU stand-in for CUDA capture -----------------------------------------------------------

_capturing = [False]


class RerunGraph:
    """A 'graph' that replays by running the recorded step again (held weakly, as a CUDA graph holds
    no Python object)."""

    alive: ClassVar[weakref.WeakSet] = weakref.WeakSet()

    def __init__(self, step: Callable[[], None]) -> None:
        self.step: Any = weakref.WeakMethod(step)
        RerunGraph.alive.add(self)

    def replay(self) -> None:
        self.step()()

    def reset(self) -> None:
        self.step = None


class RerunCapture:
    def warm_up(self, step: Callable[[], None], times: int) -> None:
        for _ in range(times):
            step()

    def capture(self, step: Callable[[], None]) -> RerunGraph:
        _capturing[0] = True
        try:
            step()
        finally:
            _capturing[0] = False
        return RerunGraph(step)


def use_cpu_stand_in() -> None:
    graphs.capturer = RerunCapture()
    loop.resolve_cuda_graphs = lambda setting, *_: setting is not False and (
        setting is True or graphs.turned_off() is None)


def capturing(device: torch.device) -> bool:
    return torch.cuda.is_current_stream_capturing() if device.type == "cuda" else _capturing[0]


def live_graphs(device: torch.device) -> int:
    """Graphs not yet destroyed: CUDAGraph objects alive, or the stand-in's graphs not reset."""
    if device.type != "cuda":
        return sum(1 for g in RerunGraph.alive if g.step is not None)
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.cuda.CUDAGraph))


# --- data, specs and trials -----------------------------------------------------------------------


def synthetic_dataset(n_train: int, n_test: int, seed: int = 0) -> Dataset:
    """Fashion-MNIST-shaped uint8 images a small CNN can learn: each class a stripe texture."""
    rng = np.random.default_rng(seed)

    def images_for(labels: np.ndarray) -> np.ndarray:
        grid = np.arange(28)
        period = 2 + (labels % 5)
        stripes = ((grid[None, :] // period[:, None]) % 2 == 0)  # (n, 28)
        horizontal = labels < 5
        mask = np.where(horizontal[:, None, None], stripes[:, :, None], stripes[:, None, :])
        noise = rng.integers(0, 80, size=(len(labels), 28, 28))
        return np.clip(noise + 150 * mask, 0, 255).astype(np.uint8)

    train_labels = (np.arange(n_train) % 10).astype(np.int64)
    test_labels = (np.arange(n_test) % 10).astype(np.int64)
    return Dataset(images_for(train_labels), train_labels, images_for(test_labels), test_labels, FASHION_MNIST)


def spec(quick: bool, model: dict | None = None, data: dict | None = None, **train_settings: Any) -> Config:
    raw = {"data": {"download": False, "val_size": 100 if quick else 1000, **(data or {})},
           "model": {"num_blocks": 1 if quick else 3, "filters": 4 if quick else 64,
                     "units1": 8 if quick else 128, "units2": 8 if quick else 64, **(model or {})},
           "train": {"epochs": 1, "batch_size": 8 if quick else 64, "eval_batch_size": 32 if quick else 256,
                     "scheduler": "none", "seed": 0, **train_settings}}
    return validate(raw)


def with_train(cfg: Config, **settings: Any) -> Config:
    raw = to_dict(cfg)
    raw["train"].update(settings)
    return validate(raw)


def splits_for(cfg: Config, n_train: int, device: torch.device, n_test: int = 200) -> Splits:
    """n_train training images after the validation split."""
    return make_splits(synthetic_dataset(n_train + cfg.data.val_size, n_test), cfg.data, device)


NO_DROPOUT = {"conv_dropout": 0.0, "dense1_dropout": 0.0, "dense2_dropout": 0.0}


def trial(cfg: Config, splits: Splits, device: torch.device, prepare: Callable | None = None,
          **fit_kwargs: Any) -> dict[str, Any]:
    """train_and_test, with prepare(model) first (a hook to inject a fault)."""
    model, engine = prepare_trial(cfg, device)
    if prepare is not None:
        prepare(model)
    try:
        result = fit(model, splits, cfg, engine, **fit_kwargs)
        test_loss, test_acc = evaluate(model, splits.test, engine, cfg.train.eval_batch_size)
    finally:
        engine.release_graphs()
    return {"model": model, "history": result.history, "test_loss": test_loss, "test_accuracy": test_acc}


class Lines(logging.Handler):
    """The package's log lines: the fallback warnings and the first-replay checks."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        log = logging.getLogger("fmnist_hpo")
        log.addHandler(self)
        log.setLevel(logging.DEBUG)

    def warnings(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= logging.WARNING]

    def checks(self) -> list[dict[str, float]]:
        return [r.graph_check for r in self.records if hasattr(r, "graph_check")]

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def deterministic(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True  # make_engine turns benchmark on; this keeps its choices deterministic
        torch.use_deterministic_algorithms(True, warn_only=True)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def max_param_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(relative(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def same_lrs(a: list, b: list) -> bool:
    """The same schedule: a graph's learning rate is a float32 tensor, an eager one a Python float."""
    return len(a) == len(b) and all(math.isclose(x.lr, y.lr, rel_tol=1e-6) for x, y in zip(a, b, strict=True))


def rel_diffs(a: list[float], b: list[float]) -> list[float]:
    return [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True)]


# --- the parts -----------------------------------------------------------------------------------


def part_train_fp32(device: torch.device, quick: bool) -> dict:
    deterministic(device)
    lines = Lines()
    cfg = spec(quick, model=NO_DROPOUT, precision="fp32", channels_last=False)
    n = 40 * cfg.train.batch_size + 17  # 40 full batches and a ragged one
    splits = splits_for(cfg, n, device)
    eager_cfg = with_train(cfg, cuda_graphs=False)
    plain = trial(eager_cfg, splits, device)  # the eager engine's own Adam (foreach, float learning rate)
    product_optimizer = loop.make_optimizer
    loop.make_optimizer = lambda model, cfg, engine: graphs.make_capturable_adam(
        model.parameters(), cfg.lr, cfg.weight_decay, engine.device)
    eager = trial(eager_cfg, splits, device)  # the graph's Adam (fused, capturable), run eagerly
    loop.make_optimizer = product_optimizer
    graphed = trial(cfg, splits, device)
    difference = max_param_difference(graphed["model"], eager["model"])
    vs_plain = max_param_difference(graphed["model"], plain["model"])
    used = len(lines.checks()) > 0 and graphs.turned_off() is None
    return {"ok": used and difference <= 1e-5,
            "measured": f"{math.ceil(n / cfg.train.batch_size)} steps: parameters apart by {difference:.1e} (largest, "
                        f"relative; {vs_plain:.1e} from the eager engine's foreach Adam)"
                        + ("" if used else f"; graphs not used: {graphs.turned_off()}"),
            "max_param_rel_diff": difference, "vs_foreach_adam": vs_plain, "checks": lines.checks(),
            "warnings": lines.warnings()}


def part_train_bf16(device: torch.device, quick: bool) -> dict:
    lines = Lines()
    cfg = spec(quick, data={"augment_flip": True, "augment_translate": 2}, precision="bf16", channels_last=True,
               epochs=3, scheduler="step", step_size=1, gamma=0.5)
    splits = splits_for(cfg, 40 * cfg.train.batch_size + 17, device)
    eager = trial(with_train(cfg, cuda_graphs=False), splits, device)
    graphed = trial(cfg, splits, device)
    diffs = rel_diffs([m.train_loss for m in graphed["history"]], [m.train_loss for m in eager["history"]])
    lrs_equal = same_lrs(graphed["history"], eager["history"])
    used = len(lines.checks()) > 0 and graphs.turned_off() is None
    return {"ok": used and max(diffs) <= 0.05 and lrs_equal,
            "measured": f"training losses apart by {max(diffs):.2%} at most, learning rates "
                        f"{'identical' if lrs_equal else 'DIFFERENT'}, val accuracy "
                        f"{graphed['history'][-1].val_accuracy:.3f} vs {eager['history'][-1].val_accuracy:.3f}"
                        + ("" if used else f"; graphs not used: {graphs.turned_off()}"),
            "loss_rel_diffs": diffs, "lrs_equal": lrs_equal, "checks": lines.checks(), "warnings": lines.warnings()}


def part_eval(device: torch.device, quick: bool) -> dict:
    deterministic(device)
    lines = Lines()
    figures, ok = {}, True
    for precision, loss_tol, acc_tol in (("fp32", 1e-5, 0.0), ("bf16", 1e-3, 0.005)):
        cfg = spec(quick, precision=precision)
        batch = cfg.train.eval_batch_size
        split = splits_for(cfg, 100, device, n_test=2 * batch + 37).test  # two full batches and a masked tail
        model, graphed_engine = prepare_trial(cfg, device)
        _, eager_engine = prepare_trial(with_train(cfg, cuda_graphs=False), device)
        eager = evaluate(model, split, eager_engine, batch)
        first = evaluate(model, split, graphed_engine, batch)  # with the first-replay check
        again = evaluate(model, split, graphed_engine, batch)  # replays only
        graphed_engine.release_graphs()
        loss_diff = max(rel_diffs([first[0], again[0]], [eager[0]] * 2))
        acc_diff = max(abs(first[1] - eager[1]), abs(again[1] - eager[1]))
        figures[precision] = {"loss_rel_diff": loss_diff, "accuracy_diff": acc_diff}
        ok &= loss_diff <= loss_tol and acc_diff <= acc_tol
    used = graphs.turned_off() is None
    return {"ok": ok and used, "figures": figures, "warnings": lines.warnings(),
            "measured": "; ".join(f"{p}: loss {f['loss_rel_diff']:.1e}, accuracy {f['accuracy_diff']:.4f} apart"
                                  for p, f in figures.items()) + ("" if used else f"; graphs not used: {graphs.turned_off()}")}


def part_dropout_lr0(device: torch.device, quick: bool) -> dict:
    cfg = spec(quick, model={"conv_dropout": 0.3, "dense1_dropout": 0.3}, precision="fp32")
    split = splits_for(cfg, 4 * cfg.train.batch_size, device).train
    model, engine = prepare_trial(cfg, device)
    optimizer = graphs.make_capturable_adam(model.parameters(), 0.0, 0.0, device)
    x = engine.inputs(split.images[:cfg.train.batch_size])
    y = split.labels[:cfg.train.batch_size]
    step = graphs.GraphedTraining(model, optimizer, x, y, 0.0, None)
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    losses = []
    for _ in range(4):
        start = step.totals.loss_sum.item()
        step.replay(x, y)
        losses.append(step.totals.loss_sum.item() - start)
    unchanged = all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    figures = step.check_figures
    step.release()
    distinct = len(set(losses))
    return {"ok": distinct == len(losses) and unchanged,
            "measured": f"{distinct} distinct losses in {len(losses)} replays of one batch; weights "
                        f"{'bitwise unchanged' if unchanged else 'CHANGED'} at lr 0; first replay vs eager with the "
                        f"same generator state: loss {figures['graphed_loss']:.6g} vs {figures['eager_loss']:.6g}",
            "losses": losses, "check": figures}


class _Collecting:
    """A step that runs a full garbage collection first while it is being captured (not on replays)."""

    def __init__(self, step: Callable[[], None]) -> None:
        self.step = step
        self.capturing = True

    def run(self) -> None:
        if self.capturing:
            gc.collect()
        self.step()


def part_gc_three_trials(device: torch.device, quick: bool) -> dict:
    lines = Lines()
    inner = graphs.capturer
    collecting = _CollectingCapture(inner)
    graphs.capturer = collecting
    rows = []
    for filters in (4, 6, 8) if quick else (32, 48, 64):
        cfg = spec(quick, model={"filters": filters})
        splits = splits_for(cfg, 20 * cfg.train.batch_size, device)
        outcome = train_and_test(cfg, splits, device)
        loss = outcome.fit.history[-1].train_loss
        del outcome, splits
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        rows.append({"filters": filters, "train_loss": loss, "live_graphs": live_graphs(device),
                     "reserved_mib": torch.cuda.memory_reserved() / 2**20 if device.type == "cuda" else 0.0})
    graphed = len(lines.checks()) == 3 and graphs.turned_off() is None and collecting.captures == 6
    growth = rows[-1]["reserved_mib"] - rows[0]["reserved_mib"]
    ok = graphed and all(r["live_graphs"] == 0 and math.isfinite(r["train_loss"]) for r in rows) and growth <= 32
    return {"ok": ok, "trials": rows,
            "measured": f"{len(lines.checks())} of 3 trials graphed, {collecting.captures} captures with a collection "
                        f"inside, graphs alive after each trial: {[r['live_graphs'] for r in rows]}, reserved memory "
                        f"{growth:+.0f} MiB from trial 1 to 3" + ("" if graphed else f"; {graphs.turned_off()}"),
            "warnings": lines.warnings()}


class _CollectingCapture:
    """graphs.capturer with a full garbage collection forced inside every capture: an old graph freed
    there would invalidate it (nothing should be left to free)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.captures = 0

    def warm_up(self, step: Callable[[], None], times: int) -> None:
        self.inner.warm_up(step, times)

    def capture(self, step: Callable[[], None]) -> Any:
        self.captures += 1
        holder = _Collecting(step)
        try:
            graph = self.inner.capture(holder.run)
        finally:
            holder.capturing = False
        graph._keeps = holder  # the stand-in holds its step weakly
        return graph


def usable_afterwards(device: torch.device, quick: bool) -> list[str]:
    """What is wrong with this process after a failed capture; empty when nothing is."""
    problems = []
    if capturing(device):
        problems.append("the current stream is still capturing")
    if device.type == "cuda":
        if torch.cuda.current_stream() != torch.cuda.default_stream():
            problems.append("the capture stream is still current")
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except RuntimeError as exc:
            problems.append(f"empty_cache raised: {str(exc).splitlines()[0][:120]}")
    ones = torch.ones(4096, device=device)
    if torch.equal(torch.nn.functional.dropout(ones, 0.5), torch.nn.functional.dropout(ones, 0.5)):
        problems.append("eager dropout draws the same mask twice (the generator still counts for a graph)")
    cfg = spec(quick, model=NO_DROPOUT, precision="fp32")
    split = splits_for(cfg, 2 * cfg.train.batch_size, device).train
    model, engine = prepare_trial(cfg, device)
    optimizer = graphs.make_capturable_adam(model.parameters(), 1e-3, 0.0, device)
    x, y = engine.inputs(split.images[:cfg.train.batch_size]), split.labels[:cfg.train.batch_size]
    try:
        step = graphs.GraphedTraining(model, optimizer, x, y, 0.0, None)
        model.train()
        step.replay(x, y)
        step.replay(x, y)
        step.release()
    except graphs.GraphError as exc:
        problems.append(f"a new capture failed: {exc}")
    return problems


def part_fallback_capture(device: torch.device, quick: bool) -> dict:
    lines = Lines()

    def sync_inside_capture(model: torch.nn.Module) -> None:
        def hook(_module: Any, _inputs: Any) -> None:
            if capturing(device):
                if device.type == "cuda":
                    torch.cuda.synchronize()  # not permitted while capturing: invalidates the capture
                else:
                    raise RuntimeError("CUDA error: operation not permitted when stream is capturing (stand-in)")
        model.register_forward_pre_hook(hook)

    cfg = spec(quick, epochs=2)
    splits = splits_for(cfg, 10 * cfg.train.batch_size, device)
    first = trial(cfg, splits, device, prepare=sync_inside_capture)
    second = trial(cfg, splits, device)  # the next trial of the process: eager, no second line
    replayed = len(lines.checks())
    problems = usable_afterwards(device, quick)
    warnings = lines.warnings()
    finite = all(math.isfinite(m.train_loss) for m in first["history"] + second["history"])
    ok = len(warnings) == 1 and "capture failed" in warnings[0] and finite and not problems and replayed == 0
    return {"ok": ok, "warnings": warnings, "problems": problems,
            "measured": f"{len(warnings)} warning line(s); both trials trained ({'finite' if finite else 'NON-FINITE'} "
                        f"losses); process {'usable' if not problems else 'NOT usable: ' + '; '.join(problems)}",
            "line": warnings[0] if warnings else None}


class _BakingCapture:
    """A capture after which the value the model multiplies its output by changes: the graph keeps the
    captured value, the eager step reads the new one. On the CPU stand-in (which reruns the step and so
    reads the new value too) the replay is made to skip the step instead."""

    def __init__(self, inner: Any, scale: list[float], device: torch.device) -> None:
        self.inner, self.scale, self.device = inner, scale, device

    def warm_up(self, step: Callable[[], None], times: int) -> None:
        self.inner.warm_up(step, times)

    def capture(self, step: Callable[[], None]) -> Any:
        graph = self.inner.capture(step)
        self.scale[0] = 2.0
        if self.device.type != "cuda":
            graph.replay = lambda: None
        return graph


def part_fallback_replay(device: torch.device, quick: bool) -> dict:
    lines = Lines()
    scale = [1.0]
    graphs.capturer = _BakingCapture(graphs.capturer, scale, device)

    def scaled(model: torch.nn.Module) -> None:
        model.register_forward_hook(lambda _m, _i, output: output * scale[0])

    cfg = spec(quick, model=NO_DROPOUT, epochs=2)
    outcome = trial(cfg, splits_for(cfg, 10 * cfg.train.batch_size, device), device, prepare=scaled)
    warnings = lines.warnings()
    finite = all(math.isfinite(m.train_loss) for m in outcome["history"])
    ok = len(warnings) == 1 and "disagrees with the same step run eagerly" in warnings[0] and finite
    return {"ok": ok, "warnings": warnings,
            "measured": f"{len(warnings)} warning line(s), the trial trained on ({'finite' if finite else 'NON-FINITE'} "
                        "losses)", "line": warnings[0] if warnings else None}


def part_resume(device: torch.device, quick: bool) -> dict:
    deterministic(device)
    lines = Lines()
    cfg = spec(quick, model={"conv_dropout": 0.2, "dense1_dropout": 0.2}, precision="fp32", epochs=3,
               scheduler="step", step_size=1, gamma=0.5)
    splits = splits_for(cfg, 10 * cfg.train.batch_size + 5, device)
    whole = trial(cfg, splits, device)

    class Stop(Exception):
        pass

    with tempfile.TemporaryDirectory() as folder:
        state_file = Path(folder) / "trial.state.pt"

        class SaveThenStop(FitHooks):
            def epoch_done(self, metrics: EpochMetrics, state: Callable[[], dict]) -> None:
                save_training_state(state_file, state())
                raise Stop  # the process is killed after its first epoch's state reached the disk

        with contextlib.suppress(Stop):
            trial(cfg, splits, device, hooks=SaveThenStop())
        resumed = trial(cfg, splits, device, resume=read_training_state(state_file))
    ours = [m.train_loss for m in resumed["history"]] + [m.val_loss for m in resumed["history"]]
    theirs = [m.train_loss for m in whole["history"]] + [m.val_loss for m in whole["history"]]
    diff = max(rel_diffs(ours, theirs))
    lrs_equal = [m.lr for m in resumed["history"]] == [m.lr for m in whole["history"]]  # both graphed: bitwise
    used = len(lines.checks()) == 3 and graphs.turned_off() is None  # a capture per trial, the resumed one included
    return {"ok": used and diff <= 1e-5 and lrs_equal, "loss_rel_diff": diff,
            "measured": f"every epoch's losses within {diff:.1e} of the uninterrupted trial, learning rates "
                        f"{'identical' if lrs_equal else 'DIFFERENT'}" + ("" if used else f"; graphs not used: "
                                                                           f"{graphs.turned_off()}")}


def packing_cfg(quick: bool) -> Config:
    return spec(quick, model={} if quick else {"filters": 256, "units1": 192, "units2": 96},
                data={"val_size": 10_000}, precision="auto", channels_last=True)


def part_packing(device: torch.device, quick: bool) -> dict:
    if device.type != "cuda":
        return {"ok": None, "measured": "skipped: measures CUDA memory"}
    cfg = packing_cfg(quick)
    dataset = synthetic_dataset(60_000, 10_000)
    estimate = packing.trial_footprint(cfg, device, dataset)
    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info(device)[0]
    child = subprocess.Popen([sys.executable, __file__, "--part", "packing_child", "--device", "cuda"]
                             + (["--quick"] if quick else []),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        ready = child.stdout.readline().strip()
        free_during = torch.cuda.mem_get_info(device)[0]
        child.stdin.write("\n")
        child.stdin.flush()
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    if not ready.startswith("READY"):
        return {"ok": False, "measured": f"the trial process did not get ready ({ready or 'no output'})"}
    real = free_before - free_during
    ratio = estimate / real if real > 0 else math.inf
    trials_per_80g = int(80 * 2**30 * packing.MEMORY_HEADROOM // estimate)
    return {"ok": 1.0 <= ratio <= 1.5, "estimate_mib": estimate / 2**20, "real_mib": real / 2**20,
            "child": ready, "context_mib": packing.context_bytes(device) / 2**20,
            "measured": f"estimate {estimate / 2**20:.0f} MiB, a real trial process {real / 2**20:.0f} MiB "
                        f"({ratio:.2f}x; {trials_per_80g} trials on 80 GiB free)"}


def part_packing_child(device: torch.device, quick: bool) -> dict:
    """A trial process as the Ray engine starts one: all of the data on the device, one epoch, one test;
    it says READY while it holds everything, and exits when told."""
    cfg = packing_cfg(quick)
    full = make_splits(synthetic_dataset(60_000, 10_000), cfg.data, device)
    steps = 40 * cfg.train.batch_size
    splits = Splits(Split(full.train.images[:steps], full.train.labels[:steps]), full.val, full.test)
    model, engine = prepare_trial(cfg, device)
    fit(model, splits, cfg, engine)
    evaluate(model, full.test, engine, cfg.train.eval_batch_size)
    torch.cuda.synchronize()
    print(f"READY reserved {torch.cuda.max_memory_reserved() / 2**20:.0f} MiB", flush=True)
    sys.stdin.readline()
    engine.release_graphs()
    return {"ok": True}


PARTS: dict[str, tuple[Callable[[torch.device, bool], dict], str]] = {
    "train_fp32": (part_train_fp32, "parameters within 1e-5 relative"),
    "train_bf16": (part_train_bf16, "losses within 5%, same lrs (to float32)"),
    "eval": (part_eval, "fp32: loss 1e-5, same accuracy; bf16: 1e-3, 0.5 pt"),
    "dropout_lr0": (part_dropout_lr0, "all losses distinct; weights bitwise equal"),
    "gc_three_trials": (part_gc_three_trials, "3 graphed, 0 alive, <= 32 MiB growth"),
    "fallback_capture": (part_fallback_capture, "1 line, trains on, process usable"),
    "fallback_replay": (part_fallback_replay, "1 line, trains on"),
    "resume": (part_resume, "losses within 1e-5, identical lrs"),
    "packing": (part_packing, "estimate 1.0x-1.5x the real trial"),
}
INTERNAL = {"packing_child": part_packing_child}


# --- running the parts ----------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS for the deterministic parts
    return env


def run_part(name: str, device: str, quick: bool, timeout: float) -> dict:
    """One part in its own process; a crash or a timeout is that part's result, not the run's."""
    with tempfile.TemporaryDirectory() as folder:
        result_file = Path(folder) / "result.json"
        command = [sys.executable, __file__, "--part", name, "--device", device, "--result", str(result_file)]
        start = time.perf_counter()
        try:
            done = subprocess.run(command + (["--quick"] if quick else []), capture_output=True, text=True,
                                  timeout=timeout, env=child_env())
        except subprocess.TimeoutExpired:
            return {"ok": False, "measured": f"timed out after {timeout:.0f} s", "seconds": timeout}
        seconds = time.perf_counter() - start
        if result_file.exists():
            return {**json.loads(result_file.read_text()), "seconds": seconds}
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"ok": False, "measured": f"crashed (exit {done.returncode}): {tail[:200]}", "seconds": seconds,
                "stderr_tail": done.stderr[-4000:]}


def in_this_process(name: str, device: torch.device, quick: bool, result_file: Path | None) -> None:
    if device.type != "cuda":
        use_cpu_stand_in()
    function = PARTS[name][0] if name in PARTS else INTERNAL[name]
    result = function(device, quick)
    if result_file is not None:
        result_file.write_text(json.dumps(result, default=str))


def table(results: dict[str, dict]) -> str:
    lines = [f"{'part':<18}{'result':<8}{'s':>6}  {'target':<52}measured"]
    for name, result in results.items():
        verdict = {True: "PASS", False: "FAIL", None: "skip"}[result.get("ok")]
        lines.append(f"{name:<18}{verdict:<8}{result.get('seconds', 0):>6.1f}  {PARTS[name][1]:<52}{result['measured']}")
    return "\n".join(lines)


def machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "device": device, "date": time.strftime("%Y-%m-%d %H:%M")}
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny models and data: a check of the script itself")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts to run (default: all)")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument("--timeout", type=float, default=PART_TIMEOUT, help="seconds per part")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        in_this_process(args.part, torch.device(args.device), args.quick, args.result)
        return
    names = [n for n in args.parts.split(",") if n]
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        raise SystemExit(f"error: unknown part {unknown[0]!r}; choose from {', '.join(PARTS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here; use --device cpu (the parts that run without CUDA)")
    results = {}
    for name in names:
        results[name] = run_part(name, args.device, args.quick, args.timeout)
        print(f"{name}: {results[name]['measured']}", file=sys.stderr, flush=True)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(args.device), "quick": args.quick, "parts": results},
                                        indent=2, default=str))
    if any(r.get("ok") is False for r in results.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
