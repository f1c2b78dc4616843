"""Training and evaluation steps replayed from CUDA graphs: one launch per step instead of hundreds.

At batch 64 the study's CNN spends ~4 ms per step in Python and kernel launches for ~0.1 ms of
GPU math (issue 11, H200). Capturing the whole step (forward, loss, backward, Adam, the running
totals) once and replaying it removes that cost. What capture needs, after PyTorch's CUDA-graphs
notes: inputs copied into static buffers; a warm-up on a side stream before capture; gradients
set to None before capture, so backward allocates them from the graph's private pool; an
optimizer built with capturable=True whose learning rate lives in a device tensor that schedulers
update in place (torch >= 2.4); autocast without its weight cache; no read of a device value
inside the step. Dropout inside the graph draws from the default CUDA generator, which
torch.cuda.graph registers; the warm-up's draws are undone, so a resumed trial replays the masks
an uninterrupted one does.

Augmentation runs eagerly before each replay and writes into the static input buffer, so it
keeps using the trial's own generator. A batch of another size (an epoch's last, ragged batch)
is left to the caller to run eagerly on the same model, optimizer and totals.

Graphs are an optimisation that must prove itself: the first replay of each capture is checked
against the same step run eagerly, and a capture that raises or a check that disagrees is a
GraphError, which the loop (training.loop) turns into eager training for the rest of the process (auto) or a
failed trial (true). Graphs are destroyed explicitly (release) rather than by the collector, and
the collector is paused during capture: a collection that frees an old graph mid-capture
invalidates the capture (pytorch PRs 158193, 195397). Everything CUDA-specific goes through
`capturer`, the seam CPU tests replace.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fmnist_hpo.errors import DeviceError, first_line

WARMUP_STEPS = 3  # the PyTorch notes warm up with a few real iterations; cudnn autotunes in the first
CHECK_LOSS_RTOL = 1e-2  # first replay vs the same step run eagerly: the batch's loss, relative
CHECK_UPDATE_RTOL = 0.2  # ... and the weights: |graphed - eager| over |eager - before|, all parameters at once
CHECK_CORRECT_RTOL = 0.01  # evaluation: correct counts of the first batch, as a share of the batch

logger = logging.getLogger("fmnist_hpo")


class GraphError(DeviceError):
    """A capture that raised, or a replay that disagrees with the same step run eagerly."""


# --- the process-wide switch --------------------------------------------------------------

_off_reason: str | None = None


def turned_off() -> str | None:
    """Why graphs are off for this process, or None while train.cuda_graphs: auto may still use them."""
    return _off_reason


def turn_off(reason: str) -> None:
    """Graphs off for the rest of this process; says so once, in one line."""
    global _off_reason
    if _off_reason is None:
        logger.warning(f"CUDA graphs off for this process, training eagerly: {reason} "
                       "(train.cuda_graphs: false skips them, true makes this an error)")
    _off_reason = reason


# --- the seam: capture and replay ---------------------------------------------------------


class Replayable(Protocol):
    def replay(self) -> None: ...
    def reset(self) -> None: ...


class CudaCapture:
    """How a step is warmed up and captured on CUDA. CPU tests put an object with the same two
    methods in `capturer` (one that records the step and runs it again on replay)."""

    def warm_up(self, step: Callable[[], None], times: int) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(times):
                step()
        torch.cuda.current_stream().wait_stream(side)

    def capture(self, step: Callable[[], None]) -> Replayable:
        graph = torch.cuda.CUDAGraph()
        pool = torch.cuda.graph_pool_handle()  # our own handle, so a failed capture's pool can be named
        stream = torch.cuda.current_stream()
        try:
            with torch.cuda.graph(graph, pool=pool):
                step()
        except BaseException:
            _unwind_capture(graph, pool, stream)
            raise
        return graph


def _unwind_capture(graph: torch.cuda.CUDAGraph, pool: Any, stream: torch.cuda.Stream) -> None:
    """Leave a usable process after a capture that raised. torch.cuda.graph's __exit__ skips
    restoring the stream when capture_end raises (an invalidated capture), and torch before 2.12
    also left the allocator routing into the graph's pool (pytorch#180395), after which
    empty_cache asserts. Each step is harmless where there is nothing to undo."""
    with contextlib.suppress(RuntimeError):
        if torch.cuda.is_current_stream_capturing():
            graph.capture_end()
    torch.cuda.set_stream(stream)
    end_allocating = getattr(torch._C, "_cuda_endAllocateToPool", None)
    if end_allocating is not None:
        with contextlib.suppress(RuntimeError):  # "not currently recording": nothing was left
            end_allocating(torch.cuda.current_device(), pool)
    # capture_end also skips the generator's capture epilogue, which would leave it counting offsets
    # for the graph, and eager dropout drawing the same numbers every step: a fresh state, same seed and offset
    generator = torch.cuda.default_generators[torch.cuda.current_device()]
    if hasattr(generator, "clone_state"):
        with contextlib.suppress(RuntimeError):
            generator.graphsafe_set_state(generator.clone_state())


capturer: Any = CudaCapture()


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No automatic garbage collection inside: a collection that frees an old graph mid-capture
    invalidates the capture."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def capture(step: Callable[[], None]) -> Replayable:
    """step captured into a graph, with the collector paused; any failure is a GraphError."""
    with collector_paused():
        try:
            return capturer.capture(step)
        except Exception as exc:
            cause = exc.__context__  # what went wrong inside the capture, when ending it failed too
            detail = f"{_first_line(cause)}, then {_first_line(exc)}" if cause is not None else _first_line(exc)
            raise GraphError(f"capture failed: {detail}") from exc


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc, 300)}" if str(exc).strip() else type(exc).__name__


# --- what capture needs from the optimizer ------------------------------------------------


def autocast(dtype: torch.dtype | None, device_type: str = "cuda") -> contextlib.AbstractContextManager:
    """Autocast for captured code: the weight-cast cache would hand the graph stale casts."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype, cache_enabled=False)


def make_capturable_adam(params, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Adam:
    """Adam whose step can be captured: its step counters and learning rate live on the device."""
    return torch.optim.Adam(params, lr=torch.tensor(lr, device=device), weight_decay=weight_decay,
                            capturable=True, fused=True)


def keep_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Undo what loading a saved state dict does to a capturable Adam.

    load_state_dict takes every group setting from the file, so a state saved with a float
    learning rate (training_state always saves floats) would leave a float that capture bakes in.
    """
    for group in optimizer.param_groups:
        group["capturable"] = True
        group["fused"] = True
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
        for param in group["params"]:
            state = optimizer.state.get(param)
            if state and "step" in state:
                state["step"] = state["step"].to(device=device, dtype=torch.float32)


class Totals:
    """Loss sum and correct count, accumulated on the device and read once."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.correct.zero_()

    def read(self) -> tuple[float, int]:
        return self.loss_sum.item(), int(self.correct.item())

    def copy(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loss_sum.clone(), self.correct.clone()

    def restore(self, saved: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.loss_sum.copy_(saved[0])
        self.correct.copy_(saved[1])


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               label_smoothing: float, dtype: torch.dtype | None, totals: Totals) -> None:
    """Forward, backward and Adam for one batch, adding its loss and correct count to totals."""
    optimizer.zero_grad(set_to_none=True)  # in a capture: backward allocates the gradients from the graph's pool
    with autocast(dtype, x.device.type):
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    loss.backward()
    optimizer.step()
    totals.loss_sum += loss.detach().float() * y.shape[0]
    totals.correct += (logits.argmax(1) == y).sum()


def snapshot_optimizer(optimizer: torch.optim.Optimizer) -> dict[int, dict[str, torch.Tensor]]:
    return {id(p): {k: v.clone() for k, v in state.items()} for p, state in optimizer.state.items()}


def restore_optimizer(optimizer: torch.optim.Optimizer, saved: dict[int, dict[str, torch.Tensor]]) -> None:
    """Put the state back in place (the graph holds these tensors); state the warm-up created is
    zeroed, which is what a fresh Adam state is."""
    for param, state in optimizer.state.items():
        before = saved.get(id(param), {})
        for key, tensor in state.items():
            if key in before:
                tensor.copy_(before[key])
            else:
                tensor.zero_()


def rng_state(device: torch.device) -> torch.Tensor:
    """The state of the generator dropout draws from on device (the default one)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class _Moment:
    """Everything a training step changes, taken now so it can be put back in place."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, totals: Totals) -> None:
        self.model, self.optimizer, self.totals = model, optimizer, totals
        self.weights = {k: v.clone() for k, v in model.state_dict().items()}
        self.optimizer_state = snapshot_optimizer(optimizer)
        self.device = next(iter(self.weights.values())).device
        self.rng = rng_state(self.device)
        self.sums = totals.copy()

    def restore(self) -> None:
        self.model.load_state_dict(self.weights)  # copies in place: a graph keeps its tensors
        restore_optimizer(self.optimizer, self.optimizer_state)
        set_rng_state(self.device, self.rng)
        self.totals.restore(self.sums)


class GraphedTraining:
    """One model's training step, captured at one batch size; the first replay is checked."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, sample_x: torch.Tensor,
                 sample_y: torch.Tensor, label_smoothing: float, dtype: torch.dtype | None) -> None:
        self.model, self.optimizer = model, optimizer
        self.label_smoothing, self.dtype = label_smoothing, dtype
        self.batch_size = sample_y.shape[0]
        self.static_x = sample_x.clone()  # clone keeps the memory format (channels_last)
        self.static_y = sample_y.clone()
        self.totals = Totals(sample_y.device)
        self.learning_rates = [group["lr"] for group in optimizer.param_groups]
        if not all(isinstance(lr, torch.Tensor) for lr in self.learning_rates):
            raise GraphError("the optimizer's learning rate is a float, which a capture would bake in")
        self.checked = False
        self.check_figures: dict[str, float] = {}  # what the first replay's check measured
        self.graph: Replayable | None = None
        self._capture()

    def matches(self, model: nn.Module, optimizer: torch.optim.Optimizer, batch_size: int,
                label_smoothing: float) -> bool:
        return (self.graph is not None and self.model is model and self.optimizer is optimizer
                and self.batch_size == batch_size and self.label_smoothing == label_smoothing)

    def _step(self) -> None:
        train_step(self.model, self.optimizer, self.static_x, self.static_y, self.label_smoothing, self.dtype,
                   self.totals)

    def _capture(self) -> None:
        """Warm up, capture, then undo what the warm-up changed (weights, Adam, dropout's generator)."""
        before = _Moment(self.model, self.optimizer, self.totals)
        self.model.train()
        try:
            capturer.warm_up(self._step, WARMUP_STEPS)
            self.graph = capture(self._step)
        finally:
            self.optimizer.zero_grad(set_to_none=True)  # a failed capture's gradients point into a dead pool
            before.restore()

    def replay(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One training step on (x, y), at the captured batch size; GraphError leaves the state as it
        was before the call, so the caller can run the same step eagerly."""
        if self.graph is None:
            raise GraphError("the graph was released")
        if any(group["lr"] is not lr for group, lr in zip(self.optimizer.param_groups, self.learning_rates, strict=True)):
            raise GraphError("the learning-rate tensor the graph reads was replaced (a scheduler on torch < 2.4?)")
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        if self.checked:
            self.graph.replay()
            return
        self._check_first_replay()

    def _check_first_replay(self) -> None:
        """The step eagerly, everything put back, the same step replayed: both must agree."""
        before = _Moment(self.model, self.optimizer, self.totals)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self._step()
        eager_loss = self.totals.loss_sum - before.sums[0]
        eager = [p.detach().clone() for p in params]
        self.optimizer.zero_grad(set_to_none=True)
        before.restore()
        self.graph.replay()
        graphed_loss = self.totals.loss_sum - before.sums[0]
        start = [before.weights[name] for name, p in self.model.named_parameters() if p.requires_grad]
        update = torch.stack([(e.float() - s.float()).square().sum() for e, s in zip(eager, start, strict=True)]).sum()
        apart = torch.stack([(p.detach().float() - e.float()).square().sum() for p, e in zip(params, eager, strict=True)]).sum()
        losses_and_norms = torch.stack([eager_loss.float(), graphed_loss.float(), update.sqrt(), apart.sqrt()]).tolist()
        eager_value, graphed_value, update_norm, apart_norm = losses_and_norms
        ratio = apart_norm / update_norm if update_norm > 0 else (0.0 if apart_norm == 0 else math.inf)
        self.check_figures = {"eager_loss": eager_value, "graphed_loss": graphed_value, "update_ratio": ratio}
        if not (math.isclose(graphed_value, eager_value, rel_tol=CHECK_LOSS_RTOL, abs_tol=1e-6)
                and ratio <= CHECK_UPDATE_RTOL):
            before.restore()
            raise GraphError(f"the first graphed training step disagrees with the same step run eagerly (loss "
                             f"{graphed_value / self.batch_size:.5g} vs {eager_value / self.batch_size:.5g}, weights "
                             f"apart by {ratio:.3g} of the step; tolerance {CHECK_LOSS_RTOL:g} and {CHECK_UPDATE_RTOL:g})")
        self.checked = True
        logger.debug(f"first graphed training step matches eager: loss {graphed_value / self.batch_size:.5g} vs "
                     f"{eager_value / self.batch_size:.5g}, weights apart by {ratio:.3g} of the step",
                     extra={"graph_check": self.check_figures})

    def release(self) -> None:
        """Destroy the graph and its memory pool now."""
        if self.graph is not None:
            self.graph.reset()
            self.graph = None


class GraphedEvaluation:
    """One model's evaluation step at a fixed batch size; a short last batch is padded and masked."""

    def __init__(self, model: nn.Module, batch_size: int, images: torch.Tensor,
                 inputs: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype | None) -> None:
        """images: any tensor of the split's images, for their shape, dtype and device; inputs turns
        uint8 images into the model's input (a plain function: a bound method of the engine would
        make a reference cycle, engine -> graph -> engine, that only the collector frees)."""
        self.model, self.batch_size = model, batch_size
        device = images.device
        self.static_images = torch.zeros((batch_size, *images.shape[1:]), dtype=images.dtype, device=device)
        self.static_labels = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.valid = torch.tensor(batch_size, device=device)  # rows of the batch that are real images
        self.rows = torch.arange(batch_size, device=device)
        self.inputs, self.dtype = inputs, dtype
        self.totals = Totals(device)
        self.checked = False
        self.graph: Replayable | None = None
        self.model.eval()
        try:
            capturer.warm_up(self._step, 1)
            self.graph = capture(self._step)
        finally:
            self.totals.reset()

    def matches(self, model: nn.Module, batch_size: int) -> bool:
        return self.graph is not None and self.model is model and self.batch_size == batch_size

    def _step(self) -> None:
        with torch.no_grad(), autocast(self.dtype, self.static_images.device.type):
            logits = self.model(self.inputs(self.static_images))
            mask = self.rows < self.valid
            losses = F.cross_entropy(logits.float(), self.static_labels, reduction="none")
            self.totals.loss_sum += (losses * mask).sum()
            self.totals.correct += ((logits.argmax(1) == self.static_labels) & mask).sum()

    def _load(self, images: torch.Tensor, labels: torch.Tensor, start: int) -> None:
        part = images[start:start + self.batch_size]
        count = part.shape[0]
        self.static_images[:count].copy_(part)
        self.static_labels[:count].copy_(labels[start:start + count])
        self.valid.fill_(count)

    def run(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        """(summed cross-entropy, correct count) over images, read from the device once."""
        if self.graph is None:
            raise GraphError("the graph was released")
        self.model.eval()  # a replay ignores the mode; the eager check and the callers after us do not
        self.totals.reset()
        first = 0
        if not self.checked:
            self._check_first_replay(images, labels)
            first = self.batch_size
        for start in range(first, images.shape[0], self.batch_size):
            self._load(images, labels, start)
            self.graph.replay()
        return self.totals.read()

    def _check_first_replay(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """The first batch eagerly and replayed; the replay's sums stay in the totals."""
        self._load(images, labels, 0)
        self._step()
        eager = self.totals.read()
        self.totals.reset()
        self.graph.replay()
        graphed = self.totals.read()
        count = min(self.batch_size, images.shape[0])
        if not (math.isclose(graphed[0], eager[0], rel_tol=CHECK_LOSS_RTOL, abs_tol=1e-6)
                and abs(graphed[1] - eager[1]) <= CHECK_CORRECT_RTOL * count):
            raise GraphError(f"the first graphed evaluation batch disagrees with the same batch run eagerly "
                             f"(loss {graphed[0] / count:.5g} vs {eager[0] / count:.5g}, correct {graphed[1]} vs {eager[1]})")
        self.checked = True

    def release(self) -> None:
        if self.graph is not None:
            self.graph.reset()
            self.graph = None
