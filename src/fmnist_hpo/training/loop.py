"""The training engine: fit() with Adam, a schedule and early stopping on a validation split.

Batches are slices of a device-side permutation of uint8 tensors that already live on the
device; losses and correct counts accumulate on the device and are read once per epoch, so a
step never waits for the host. On CUDA each step is replayed from a CUDA graph (graphs.py)
unless train.cuda_graphs says otherwise; everywhere else the loop below runs as written. A graph
that fails (its capture, or the check of its first replay) turns graphs off for the process
under auto, or fails the trial under true (fall_back).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from fmnist_hpo.config.sections import cuda_graph_conflicts
from fmnist_hpo.data.datasets import DatasetInfo, dataset_named
from fmnist_hpo.data.splits import Split, Splits
from fmnist_hpo.errors import DeviceError
from fmnist_hpo.records import EpochMetrics, TrialRecord
from fmnist_hpo.selection import maximizes
from fmnist_hpo.training import graphs
from fmnist_hpo.training.batches import augment, batches, normalize, steps_per_epoch
from fmnist_hpo.training.device import PRECISION_NAMES, keep_cpu_buffers, resolve_precision
from fmnist_hpo.training.hooks import FitHooks
from fmnist_hpo.training.model import folded_batchnorm

if TYPE_CHECKING:
    from fmnist_hpo.config.sections import Config, DataConfig, TrainConfig


class TrialDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


def resolve_cuda_graphs(setting: bool | str, device: torch.device, dtype: torch.dtype | None,
                        compiled: bool) -> bool:
    """Whether steps replay from CUDA graphs; auto: wherever they can (and have not failed in this
    process), true: or a clear error."""
    if setting is False or (setting == "auto" and graphs.turned_off() is not None):
        return False
    conflicts = cuda_graph_conflicts(device.type, compiled, PRECISION_NAMES[dtype])
    if not conflicts:
        return True
    if setting == "auto":
        return False
    raise DeviceError(conflicts[0])


@dataclass
class EarlyStopping:
    """Tracks the best value of the monitored metric and how long since it improved."""

    patience: int | None
    min_delta: float
    maximize: bool
    best: float = math.nan
    best_epoch: int = -1
    stale: int = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record one epoch's value; True when it is a new best."""
        gain = (value - self.best) if self.maximize else (self.best - value)
        if self.best_epoch < 0 or gain > self.min_delta:
            self.best, self.best_epoch, self.stale = value, epoch, 0
            return True
        self.stale += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.stale >= self.patience


@dataclass
class FitResult:
    history: list[EpochMetrics]
    kept_epoch: int  # the best epoch by the sweep's metric
    best_state: dict[str, torch.Tensor]
    train_seconds: float
    stopped_early: bool
    pruned_at: int | None = None  # the epoch after which a pruner stopped the trial

    @property
    def kept(self) -> EpochMetrics:
        return self.history[self.kept_epoch]


@dataclass
class Engine:
    """What one trial trains with: the device, the autocast dtype, the RNG for batches and the dataset
    (whose mean and std normalise them)."""

    device: torch.device
    dtype: torch.dtype | None
    generator: torch.Generator
    dataset: DatasetInfo
    channels_last: bool = False
    compiled: bool = False  # the model is torch.compile'd in place: evaluate it as it is
    scaler: torch.amp.GradScaler | None = field(default=None)
    cuda_graphs: bool = False
    graphs_required: bool = False  # train.cuda_graphs: true: a failing graph fails the trial
    train_graph: graphs.GraphedTraining | None = None  # the last captured step, reused while it fits
    eval_graph: graphs.GraphedEvaluation | None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        return model_inputs(images, self.dataset, self.channels_last)

    def release_graphs(self) -> None:
        """Destroy the captured graphs and their memory pools now, not whenever the collector runs."""
        for graph in (self.train_graph, self.eval_graph):
            if graph is not None:
                graph.release()
        self.train_graph = self.eval_graph = None


def model_inputs(images: torch.Tensor, info: DatasetInfo, channels_last: bool) -> torch.Tensor:
    """uint8 images -> what the model takes: floats normalised for info, in NHWC where channels_last."""
    x = normalize(images, info)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def fall_back(engine: Engine, error: graphs.GraphError) -> None:
    """A graph failed: under train.cuda_graphs true the trial fails with it; under auto this trial
    and every later one in the process train eagerly, and one warning line says why."""
    engine.release_graphs()
    if engine.graphs_required:
        raise graphs.GraphError(f"train.cuda_graphs: true: {error}") from error
    graphs.turn_off(str(error))
    engine.cuda_graphs = False


def make_engine(cfg: TrainConfig, device: torch.device, seed: int, info: DatasetInfo) -> Engine:
    dtype = resolve_precision(cfg.precision, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: autotuned kernels pay off after one batch
    if device.type == "cpu":
        keep_cpu_buffers()
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return Engine(
        device=device,
        dtype=dtype,
        generator=generator,
        dataset=info,
        channels_last=cfg.channels_last and device.type in ("cuda", "cpu"),  # MPS support is patchy
        compiled=cfg.compile,
        scaler=torch.amp.GradScaler(device.type) if dtype == torch.float16 else None,
        cuda_graphs=resolve_cuda_graphs(cfg.cuda_graphs, device, dtype, cfg.compile),
        graphs_required=cfg.cuda_graphs is True,
    )


def make_optimizer(model: nn.Module, cfg: TrainConfig, engine: Engine) -> torch.optim.Optimizer:
    if engine.cuda_graphs:
        return graphs.make_capturable_adam(model.parameters(), cfg.lr, cfg.weight_decay, engine.device)
    # fused on CPU: one kernel per parameter instead of a dozen, 0.3 ms a step instead of 1.0 (quick.yaml's model)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=engine.device.type == "cpu" or None)


def train_epoch(model: nn.Module, split: Split, optimizer: torch.optim.Optimizer, engine: Engine,
                cfg: TrainConfig, data_cfg: DataConfig,
                step_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                on_steps: Callable[[int, int], None] | None = None) -> tuple[float, float]:
    """One pass over the training split; returns (mean loss, accuracy), read from the device once.
    on_steps hears (steps done, steps in the epoch) as epoch_batches tells it.

    Under CUDA graphs every full batch is replayed and the ragged last one runs eagerly, on the same
    model, optimizer and totals; the batches and their augmentation are the same either way.
    """
    graph = _train_graph(model, split, optimizer, engine, cfg)
    totals = graph.totals if graph is not None else graphs.Totals(engine.device)
    totals.reset()
    model.train()  # replays ignore the mode; the eager steps do not
    seen = 0
    for idx in epoch_batches(len(split), cfg.batch_size, engine, on_steps):
        x = augment(engine.inputs(split.images[idx]), data_cfg, engine.generator, engine.dataset)
        y = split.labels[idx]
        if not (graph is not None and len(idx) == graph.batch_size and _replayed(graph, x, y, engine)):
            graph = engine.train_graph  # None once graphs have failed
            _eager_step(model, optimizer, x, y, engine, cfg, totals)
        if step_scheduler is not None:
            step_scheduler.step()  # under graphs: writes into the learning-rate tensor the graph reads
        seen += len(idx)
    loss_sum, correct = totals.read()
    return loss_sum / max(seen, 1), correct / max(seen, 1)


def _eager_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                engine: Engine, cfg: TrainConfig, totals: graphs.Totals) -> None:
    optimizer.zero_grad(set_to_none=True)
    with engine.autocast():
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
    if engine.scaler is not None:
        engine.scaler.scale(loss).backward()
        engine.scaler.step(optimizer)
        engine.scaler.update()
    else:
        loss.backward()
        optimizer.step()
    totals.loss_sum += loss.detach().float() * y.shape[0]
    totals.correct += (logits.argmax(1) == y).sum()


def _train_graph(model: nn.Module, split: Split, optimizer: torch.optim.Optimizer, engine: Engine,
                 cfg: TrainConfig) -> graphs.GraphedTraining | None:
    """The engine's captured step for this model and batch size, captured now if need be; None: eager."""
    if not engine.cuda_graphs:
        return None
    size = min(cfg.batch_size, len(split))
    graph = engine.train_graph
    if graph is not None and graph.matches(model, optimizer, size, cfg.label_smoothing):
        return graph
    if graph is not None:
        graph.release()
        engine.train_graph = None
    try:
        engine.train_graph = graphs.GraphedTraining(model, optimizer, engine.inputs(split.images[:size]),
                                                    split.labels[:size], cfg.label_smoothing, engine.dtype)
    except graphs.GraphError as exc:
        fall_back(engine, exc)
    return engine.train_graph


def _replayed(graph: graphs.GraphedTraining, x: torch.Tensor, y: torch.Tensor, engine: Engine) -> bool:
    """graph's step on (x, y); False when the graph just failed, leaving the step to run eagerly."""
    try:
        graph.replay(x, y)
    except graphs.GraphError as exc:
        fall_back(engine, exc)
        return False
    return True


def epoch_batches(n: int, batch_size: int, engine: Engine,
                  on_steps: Callable[[int, int], None] | None = None) -> Iterator[torch.Tensor]:
    """The epoch's batches; on_steps hears (steps done, steps in the epoch) about 100 times an epoch
    (a CPU epoch can take minutes), never in a way that waits for the device."""
    total = steps_per_epoch(n, batch_size)
    every = max(1, total // 100)
    for done, idx in enumerate(batches(n, batch_size, engine.generator, engine.device), start=1):
        yield idx
        if on_steps is not None and (done % every == 0 or done == total):
            on_steps(done, total)


def evaluate(model: nn.Module, split: Split, engine: Engine, batch_size: int = 1024) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of model on split, in eval mode."""
    graph = _eval_graph(model, split, engine, batch_size)
    if graph is not None:
        try:
            loss_sum, correct = graph.run(split.images, split.labels)
        except graphs.GraphError as exc:
            fall_back(engine, exc)
        else:
            return loss_sum / len(split), correct / len(split)
    model.eval()
    if engine.device.type == "cpu" and not engine.compiled:
        model = folded_batchnorm(model)  # 1.1x to 2.6x faster on CPU (BENCHMARKS.md); CUDA replays graphs
    return _evaluate_eagerly(model, split, engine, batch_size)


def _eval_graph(model: nn.Module, split: Split, engine: Engine, batch_size: int) -> graphs.GraphedEvaluation | None:
    if not engine.cuda_graphs:
        return None
    graph = engine.eval_graph
    if graph is not None and graph.matches(model, batch_size):
        return graph
    if graph is not None:
        graph.release()
        engine.eval_graph = None
    try:
        engine.eval_graph = graphs.GraphedEvaluation(model, batch_size, split.images,
                                                     functools.partial(model_inputs, info=engine.dataset,
                                                                       channels_last=engine.channels_last),
                                                     engine.dtype)
    except graphs.GraphError as exc:
        fall_back(engine, exc)
    return engine.eval_graph


@torch.inference_mode()
def _evaluate_eagerly(model: nn.Module, split: Split, engine: Engine, batch_size: int) -> tuple[float, float]:
    model.eval()
    loss_sum = torch.zeros((), device=engine.device)
    correct = torch.zeros((), device=engine.device, dtype=torch.long)
    for start in range(0, len(split), batch_size):
        x = engine.inputs(split.images[start:start + batch_size])
        y = split.labels[start:start + batch_size]
        with engine.autocast():
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    return loss_sum.item() / len(split), correct.item() / len(split)


def make_schedulers(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int,
                    cycle_momentum: bool = True):
    """(per-epoch scheduler, per-step scheduler); at most one of them is set.

    cycle_momentum=False keeps Adam's beta1 at 0.9 under one-cycle: a captured Adam step holds
    its betas as constants, so a graph could not follow the cycle anyway.
    """
    sched = torch.optim.lr_scheduler
    if cfg.scheduler == "step":
        return sched.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma), None
    if cfg.scheduler == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=cfg.epochs), None
    if cfg.scheduler == "onecycle":
        return None, sched.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                      cycle_momentum=cycle_momentum)
    return None, None


def fit(model: nn.Module, splits: Splits, cfg: Config, engine: Engine, hooks: FitHooks | None = None,
        resume: dict[str, Any] | None = None) -> FitResult:
    """Train with early stopping on the validation split and return the kept epoch's weights.

    The kept epoch is the best by the sweep's metric (cfg.search.metric, see selection.py); early
    stopping watches cfg.train.monitor with its own patience and only decides when to stop.
    hooks hears every epoch and may prune (see hooks.py); resume is a state they were handed.
    """
    hooks = hooks or FitHooks()
    train_cfg = cfg.train
    optimizer = make_optimizer(model, train_cfg, engine)
    steps = steps_per_epoch(len(splits.train), train_cfg.batch_size)
    schedulers = make_schedulers(optimizer, train_cfg, steps, cycle_momentum=not engine.cuda_graphs)
    loop = LoopState(EarlyStopping(train_cfg.patience, train_cfg.min_delta, maximize=maximizes(train_cfg.monitor)),
                     keeper=EarlyStopping(None, 0.0, maximize=maximizes(cfg.search.metric)),
                     best_state=_snapshot(model))
    if resume is not None:
        restore_training_state(resume, loop, model, optimizer, schedulers, engine)
        if engine.cuda_graphs:
            graphs.keep_capturable(optimizer, engine.device)
    pruned_at = None
    for epoch in range(loop.next_epoch, train_cfg.epochs):
        if loop.stopper.should_stop:
            break
        metrics = run_epoch(model, splits, optimizer, schedulers, engine, cfg, epoch, hooks.steps_done)
        loop.record(metrics, model)
        hooks.epoch_done(metrics, functools.partial(training_state, loop, model, optimizer, schedulers, engine))
        if epoch < train_cfg.epochs - 1 and hooks.should_prune(metrics):
            pruned_at = epoch
            break
    model.load_state_dict(loop.best_state)
    return FitResult(loop.history, loop.keeper.best_epoch, loop.best_state, loop.train_seconds,
                     stopped_early=len(loop.history) < train_cfg.epochs, pruned_at=pruned_at)


def run_epoch(model: nn.Module, splits: Splits, optimizer: torch.optim.Optimizer, schedulers: tuple[Any, Any],
              engine: Engine, cfg: Config, epoch: int, on_steps: Callable[[int, int], None]) -> EpochMetrics:
    """Train one epoch, validate, step the per-epoch scheduler; a loss that is not finite ends the trial."""
    epoch_scheduler, step_scheduler = schedulers
    # train_epoch and evaluate end by reading their totals from the device, so these clocks
    # stop after the GPU has finished: no extra synchronisation is needed.
    start = time.perf_counter()
    lr = float(optimizer.param_groups[0]["lr"])
    train_loss, train_acc = train_epoch(model, splits.train, optimizer, engine, cfg.train, cfg.data, step_scheduler,
                                        on_steps)
    trained = time.perf_counter()
    if not math.isfinite(train_loss):
        raise TrialDiverged(f"training loss became {train_loss} at epoch {epoch}")
    val_loss, val_acc = evaluate(model, splits.val, engine, cfg.train.eval_batch_size)
    evaluated = time.perf_counter()
    if not math.isfinite(val_loss):
        raise TrialDiverged(f"validation loss became {val_loss} at epoch {epoch}")
    if epoch_scheduler is not None:
        epoch_scheduler.step()
    return EpochMetrics(epoch, train_loss, train_acc, val_loss, val_acc, lr, time.perf_counter() - start,
                        train_seconds=trained - start, eval_seconds=evaluated - trained)


@dataclass
class LoopState:
    """What fit() carries from one epoch to the next."""

    stopper: EarlyStopping  # watches train.monitor: when to stop
    keeper: EarlyStopping  # watches search.metric: which epoch to keep
    best_state: dict[str, torch.Tensor]  # the kept epoch's weights
    history: list[EpochMetrics] = field(default_factory=list)
    train_seconds: float = 0.0
    next_epoch: int = 0

    def record(self, metrics: EpochMetrics, model: nn.Module) -> None:
        """An epoch done: its figures kept, both trackers told, its weights kept where it is the best so far."""
        self.train_seconds += metrics.epoch_seconds
        self.history.append(metrics)
        self.stopper.update(metrics.val_accuracy if self.stopper.maximize else metrics.val_loss, metrics.epoch)
        if self.keeper.update(metrics.val_accuracy if self.keeper.maximize else metrics.val_loss, metrics.epoch):
            self.best_state = _snapshot(model)
        self.next_epoch = metrics.epoch + 1


def training_state(loop: LoopState, model: nn.Module, optimizer: torch.optim.Optimizer,
                   schedulers: tuple[Any, Any], engine: Engine) -> dict[str, Any]:
    """Everything needed to continue training, as tensors and plain values (loads with weights_only=True)."""
    return {
        "next_epoch": loop.next_epoch,
        "model": model.state_dict(),
        "optimizer": _portable(optimizer.state_dict()),
        "schedulers": [s.state_dict() if s is not None else None for s in schedulers],
        "scaler": engine.scaler.state_dict() if engine.scaler is not None else None,
        "stopper": _tracker_state(loop.stopper),
        "keeper": _tracker_state(loop.keeper),
        "best_state": loop.best_state,
        "history": [dataclasses.asdict(m) for m in loop.history],
        "train_seconds": loop.train_seconds,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if engine.device.type == "cuda" else [],
        "engine_rng": engine.generator.get_state(),
    }


def restore_training_state(state: dict[str, Any], loop: LoopState, model: nn.Module, optimizer: torch.optim.Optimizer,
                           schedulers: tuple[Any, Any], engine: Engine) -> None:
    """The inverse of training_state: model, optimizer, schedulers, RNGs and loop as they were."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    for scheduler, saved in zip(schedulers, state["schedulers"], strict=True):
        if scheduler is not None and saved is not None:
            scheduler.load_state_dict(saved)
    if engine.scaler is not None and state["scaler"] is not None:
        engine.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    engine.generator.set_state(state["engine_rng"])
    _restore_tracker(loop.stopper, state["stopper"])
    _restore_tracker(loop.keeper, state["keeper"])
    loop.best_state = state["best_state"]
    loop.history = [EpochMetrics(**m) for m in state["history"]]
    loop.train_seconds = state["train_seconds"]
    loop.next_epoch = state["next_epoch"]


@dataclass
class TrialOutcome:
    model: nn.Module  # holding the best epoch's weights
    fit: FitResult
    test_loss: float
    test_accuracy: float
    total_parameters: int

    def record_into(self, record: TrialRecord) -> None:
        """The trial's figures, as both engines log them: the kept epoch, the pruned one (1-based) and the test."""
        record.keep(self.fit.kept, self.fit.history)
        record.pruned_at = None if self.fit.pruned_at is None else self.fit.pruned_at + 1
        record.test_accuracy, record.test_loss = self.test_accuracy, self.test_loss
        record.total_parameters = self.total_parameters


def prepare_trial(cfg: Config, device: torch.device) -> tuple[nn.Module, Engine]:
    """The seeded model on the device (channels_last, compiled as configured) and its engine."""
    from fmnist_hpo.training.model import build_model

    torch.manual_seed(cfg.train.seed)
    info = dataset_named(cfg.data.dataset)
    engine = make_engine(cfg.train, device, cfg.train.seed, info)
    model = build_model(cfg.model, info).to(device)
    if engine.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        model.compile()
    return model, engine


def train_and_test(cfg: Config, splits: Splits, device: torch.device, hooks: FitHooks | None = None,
                   resume: dict[str, Any] | None = None) -> TrialOutcome:
    """Build the model, fit it on train/val, then score the kept epoch's weights once on the test set."""
    from fmnist_hpo.training.model import count_parameters

    model, engine = prepare_trial(cfg, device)
    try:
        result = fit(model, splits, cfg, engine, hooks, resume)
        test_loss, test_acc = evaluate(model, splits.test, engine, cfg.train.eval_batch_size)
    finally:
        engine.release_graphs()
    return TrialOutcome(model, result, test_loss, test_acc, count_parameters(model))


def _portable(optimizer_state: dict[str, Any]) -> dict[str, Any]:
    """The optimizer's state with plain-float learning rates, loadable by either kind of Adam."""
    groups = [{**g, "lr": float(g["lr"])} for g in optimizer_state["param_groups"]]
    return {**optimizer_state, "param_groups": groups}


def _tracker_state(tracker: EarlyStopping) -> dict[str, float]:
    return {"best": tracker.best, "best_epoch": tracker.best_epoch, "stale": tracker.stale}


def _restore_tracker(tracker: EarlyStopping, saved: dict[str, float]) -> None:
    tracker.best, tracker.best_epoch, tracker.stale = saved["best"], int(saved["best_epoch"]), int(saved["stale"])


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
