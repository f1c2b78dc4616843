"""Training and evaluation steps replayed from CUDA graphs: one launch per step instead of hundreds.

At batch 64 the study's CNN spends ~4 ms per step in Python and kernel launches for ~0.1 ms of
GPU math (issue 11, H200). Capturing the whole step (forward, loss, backward, Adam, the running
totals) once and replaying it removes that cost. What capture needs, after PyTorch's CUDA-graphs
notes: inputs copied into static buffers; a warm-up on a side stream before capture; gradients
set to None before capture, so backward allocates them from the graph's private pool; an
optimizer built with capturable=True whose learning rate lives in a device tensor that schedulers
update in place; autocast without its weight cache; no read of a device value inside the step.
Dropout inside the graph draws from the default CUDA generator, which torch.cuda.graph registers.

Augmentation runs eagerly before each replay and writes into the static input buffer, so it
keeps using the trial's own generator. A batch of another size (an epoch's last, ragged batch)
runs eagerly on the same model, optimizer and totals instead of forcing a second capture.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

WARMUP_STEPS = 3  # the PyTorch notes warm up with a few real iterations; cudnn autotunes in the first


def autocast(dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast for captured code: the weight-cast cache would hand the graph stale casts."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype, cache_enabled=False)


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


class _Totals:
    """Loss sum and correct count, accumulated on the device and read once."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.correct.zero_()

    def read(self) -> tuple[float, int]:
        return self.loss_sum.item(), int(self.correct.item())


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                label_smoothing: float, dtype: torch.dtype | None, totals: _Totals) -> None:
    """Forward, backward and Adam for one batch; the caller sets the gradients to None first."""
    with autocast(dtype):
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


class GraphedTraining:
    """One model's training step, captured at one batch size."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, sample_x: torch.Tensor,
                 sample_y: torch.Tensor, label_smoothing: float, dtype: torch.dtype | None) -> None:
        self.model, self.optimizer = model, optimizer
        self.label_smoothing, self.dtype = label_smoothing, dtype
        self.batch_size = sample_y.shape[0]
        self.static_x = sample_x.clone()  # clone keeps the memory format (channels_last)
        self.static_y = sample_y.clone()
        self.totals = _Totals(sample_y.device)
        self.graph = torch.cuda.CUDAGraph()
        self._capture()

    def matches(self, model: nn.Module, optimizer: torch.optim.Optimizer, batch_size: int,
                label_smoothing: float) -> bool:
        return (self.model is model and self.optimizer is optimizer and self.batch_size == batch_size
                and self.label_smoothing == label_smoothing)

    def _capture(self) -> None:
        """Warm up on a side stream, capture, then undo what the warm-up steps changed."""
        weights = {k: v.clone() for k, v in self.model.state_dict().items()}
        optimizer_state = snapshot_optimizer(self.optimizer)
        self.model.train()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.optimizer.zero_grad(set_to_none=True)
                self._step(self.static_x, self.static_y)
        torch.cuda.current_stream().wait_stream(side)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph):
            self._step(self.static_x, self.static_y)
        self.model.load_state_dict(weights)  # copies in place: the graph keeps its tensors
        restore_optimizer(self.optimizer, optimizer_state)
        self.totals.reset()

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        _train_step(self.model, self.optimizer, x, y, self.label_smoothing, self.dtype, self.totals)

    def run(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One training step on (x, y): replayed at the captured size, eager at any other."""
        if y.shape[0] == self.batch_size:
            self.static_x.copy_(x)
            self.static_y.copy_(y)
            self.graph.replay()
            return
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        self._step(x, y)


class GraphedEvaluation:
    """One model's evaluation step at a fixed batch size; a short last batch is padded and masked."""

    def __init__(self, model: nn.Module, batch_size: int, images: torch.Tensor,
                 inputs: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype | None) -> None:
        """images: any tensor of the split's images, for their shape, dtype and device."""
        self.model, self.batch_size = model, batch_size
        device = images.device
        self.static_images = torch.zeros((batch_size, *images.shape[1:]), dtype=images.dtype, device=device)
        self.static_labels = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.valid = torch.tensor(batch_size, device=device)  # rows of the batch that are real images
        self.rows = torch.arange(batch_size, device=device)
        self.inputs, self.dtype = inputs, dtype
        self.totals = _Totals(device)
        self.graph = torch.cuda.CUDAGraph()
        self._capture()

    def matches(self, model: nn.Module, batch_size: int) -> bool:
        return self.model is model and self.batch_size == batch_size

    def _capture(self) -> None:
        self.model.eval()
        with torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._step()
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(self.graph):
                self._step()
        self.totals.reset()

    def _step(self) -> None:
        with autocast(self.dtype):
            logits = self.model(self.inputs(self.static_images))
        mask = self.rows < self.valid
        losses = F.cross_entropy(logits.float(), self.static_labels, reduction="none")
        self.totals.loss_sum += (losses * mask).sum()
        self.totals.correct += ((logits.argmax(1) == self.static_labels) & mask).sum()

    def run(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        """(summed cross-entropy, correct count) over images, read from the device once."""
        self.totals.reset()
        for start in range(0, images.shape[0], self.batch_size):
            part = images[start:start + self.batch_size]
            count = part.shape[0]
            self.static_images[:count].copy_(part)
            self.static_labels[:count].copy_(labels[start:start + count])
            self.valid.fill_(count)
            self.graph.replay()
        return self.totals.read()
