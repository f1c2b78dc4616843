"""train.cuda_graphs: when steps are captured, what a failing graph does, and (on CUDA only) that captured
training matches eager.

On CPU the graphed code path runs through graphs.capturer, the one seam CUDA capture goes through:
RecordingCapture records a step and runs it again on replay, so every line of graphs.py and of the
graphed epoch except the CUDA calls themselves runs here; the failing and disagreeing variants stand
for a capture that raises and a replay that computes something else.
"""

import copy
import gc
import logging
import weakref
from pathlib import Path

import pytest
import torch
from conftest import tiny_raw

from fmnist_hpo.config.loading import to_dict
from fmnist_hpo.config.sections import Config, validate
from fmnist_hpo.data.datasets import FASHION_MNIST
from fmnist_hpo.data.loading import load_dataset
from fmnist_hpo.data.splits import make_splits
from fmnist_hpo.errors import ConfigError, DeviceError
from fmnist_hpo.training import graphs, loop
from fmnist_hpo.training.hooks import FitHooks
from fmnist_hpo.training.loop import fit, make_engine, prepare_trial, resolve_cuda_graphs, train_and_test

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def test_auto_captures_only_on_cuda_without_compile_or_fp16():
    assert resolve_cuda_graphs("auto", CUDA, torch.bfloat16, compiled=False)
    assert not resolve_cuda_graphs("auto", CPU, None, compiled=False)
    assert not resolve_cuda_graphs("auto", CUDA, torch.bfloat16, compiled=True)
    assert not resolve_cuda_graphs("auto", CUDA, torch.float16, compiled=False)
    assert not resolve_cuda_graphs(False, CUDA, None, compiled=False)


def test_true_where_graphs_cannot_run_is_a_clear_error():
    with pytest.raises(DeviceError, match=r"train.cuda_graphs: true needs a CUDA device, and this run is on cpu"):
        resolve_cuda_graphs(True, CPU, None, compiled=False)
    with pytest.raises(DeviceError, match="fp16"):
        resolve_cuda_graphs(True, CUDA, torch.float16, compiled=False)
    with pytest.raises(ConfigError, match=r"cuda_graphs: true needs a CUDA device, and this run is on cpu"):
        validate({"train": {"cuda_graphs": True, "device": "cpu"}})
    with pytest.raises(ConfigError, match="exclusive"):
        validate({"train": {"cuda_graphs": True, "compile": True}})


def test_the_cpu_engine_does_not_capture():
    engine = make_engine(validate({"train": {"cuda_graphs": "auto"}}).train, CPU, 0, FASHION_MNIST)
    assert not engine.cuda_graphs


def test_undoing_the_warm_up_leaves_adam_as_it_was():
    """What capture does around its warm-up steps, checked on CPU where capturable fused Adam also runs."""
    def two_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            model(torch.ones(3, 4)).square().sum().backward()
            optimizer.step()

    torch.manual_seed(0)
    warmed = torch.nn.Linear(4, 2)
    fresh = copy.deepcopy(warmed)
    weights = copy.deepcopy(warmed.state_dict())
    optimizer = graphs.make_capturable_adam(warmed.parameters(), 1e-2, 0.0, CPU)
    before = graphs.snapshot_optimizer(optimizer)
    two_steps(warmed, optimizer)  # the warm-up
    warmed.load_state_dict(weights)
    graphs.restore_optimizer(optimizer, before)
    two_steps(warmed, optimizer)
    two_steps(fresh, graphs.make_capturable_adam(fresh.parameters(), 1e-2, 0.0, CPU))
    assert torch.equal(warmed.weight, fresh.weight) and torch.equal(warmed.bias, fresh.bias)


def test_a_loaded_state_keeps_the_optimizer_capturable():
    model = torch.nn.Linear(4, 2)
    saved = torch.optim.Adam(model.parameters(), lr=3e-3).state_dict()  # as an eager run saves it
    optimizer = graphs.make_capturable_adam(model.parameters(), 1e-3, 0.0, CPU)
    optimizer.load_state_dict(saved)
    graphs.keep_capturable(optimizer, CPU)
    group = optimizer.param_groups[0]
    assert group["capturable"] and isinstance(group["lr"], torch.Tensor) and float(group["lr"]) == pytest.approx(3e-3)


class Replay:
    """A recorded step; replay runs it again. It holds the step weakly, as a CUDA graph holds no Python object."""

    def __init__(self, step) -> None:
        self.step = weakref.WeakMethod(step)
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        self.step()()

    def reset(self) -> None:
        self.step = None


class RecordingCapture:
    """graphs.capturer on CPU: capture runs the step once (as a capture records it), replay runs it again."""

    def __init__(self) -> None:
        self.graphs: list[Replay] = []
        self.owners: list[weakref.ref] = []  # the GraphedTraining/GraphedEvaluation of each capture
        self.collector_enabled: list[bool] = []

    def warm_up(self, step, times: int) -> None:
        for _ in range(times):
            step()

    def capture(self, step) -> Replay:
        self.collector_enabled.append(gc.isenabled())
        step()
        self.owners.append(weakref.ref(step.__self__))
        self.graphs.append(Replay(step))
        return self.graphs[-1]


class FailingCapture(RecordingCapture):
    def capture(self, step) -> Replay:
        self.collector_enabled.append(gc.isenabled())
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")


class StaleReplay(Replay):
    """A graph that does not do its work: the weights do not move, the loss is not counted."""

    def replay(self) -> None:
        self.replays += 1


class DisagreeingCapture(RecordingCapture):
    def capture(self, step) -> Replay:
        super().capture(step)
        self.graphs[-1] = StaleReplay(step)
        return self.graphs[-1]


@pytest.fixture
def graphs_on_cpu(monkeypatch: pytest.MonkeyPatch):
    """CPU trials take the graphed path through the capture seam; returns a function that installs a capturer."""
    monkeypatch.setattr(graphs, "_off_reason", None)
    monkeypatch.setattr(loop, "resolve_cuda_graphs", lambda setting, *_: setting is not False and
                        (setting is True or graphs.turned_off() is None))

    def install(capturer: RecordingCapture) -> RecordingCapture:
        monkeypatch.setattr(graphs, "capturer", capturer)
        return capturer

    return install


def cpu_cfg(data_dir: Path, dropout: bool = True, **train_settings) -> Config:
    model = {} if dropout else {"conv_dropout": 0.0, "dense1_dropout": 0.0, "dense2_dropout": 0.0}
    return validate(tiny_raw(data_dir, model={"conv_dropout": 0.2, "dense1_dropout": 0.2, **model},
                             data={"augment_flip": True},
                             train={"epochs": 3, "scheduler": "step", "step_size": 1, "gamma": 0.5,
                                    **train_settings}))


def cpu_run(cfg: Config, data_dir: Path, **kwargs):
    splits = make_splits(load_dataset(cfg.data), cfg.data, CPU)
    return train_and_test(cfg, splits, CPU, **kwargs)


class KeepStates(FitHooks):
    """A copy of the training state after every epoch, as the sweep would save it."""

    def __init__(self) -> None:
        self.states: list[dict] = []

    def epoch_done(self, metrics, state) -> None:
        self.states.append(copy.deepcopy(state()))


def losses(outcome) -> list[float]:
    return [m.train_loss for m in outcome.fit.history] + [m.val_loss for m in outcome.fit.history]


def test_graphed_training_through_the_seam_follows_eager_training(data_dir: Path, graphs_on_cpu):
    """Capture undoes its warm-up (weights, Adam, dropout's generator), the ragged batch runs eagerly,
    schedulers move the captured learning rate, evaluation pads and masks its last batch."""
    cfg = cpu_cfg(data_dir)
    eager = cpu_run(validate({**to_dict(cfg), "train": {**to_dict(cfg)["train"],
                                                        "cuda_graphs": False}}), data_dir)
    capturer = graphs_on_cpu(RecordingCapture())
    graphed = cpu_run(cfg, data_dir)
    assert len(capturer.graphs) == 2 and all(g.replays > 0 for g in capturer.graphs)  # training and evaluation
    assert losses(graphed) == pytest.approx(losses(eager), rel=1e-4)
    assert [m.lr for m in graphed.fit.history] == pytest.approx([m.lr for m in eager.fit.history])
    assert graphed.test_loss == pytest.approx(eager.test_loss, rel=1e-4)


def test_a_graphed_trial_resumed_from_its_state_matches_an_uninterrupted_one(data_dir: Path, graphs_on_cpu):
    """With dropout: the warm-up before each capture draws from the generator and must give it back."""
    graphs_on_cpu(RecordingCapture())
    cfg = cpu_cfg(data_dir)
    kept = KeepStates()
    whole = cpu_run(cfg, data_dir, hooks=kept)
    resumed = cpu_run(cfg, data_dir, resume=kept.states[0])
    assert graphs.turned_off() is None  # both replayed graphs throughout
    assert losses(resumed) == losses(whole)


def test_graphs_are_destroyed_at_trial_end_and_hold_no_cycle(data_dir: Path, graphs_on_cpu):
    capturer = graphs_on_cpu(RecordingCapture())
    gc.collect()
    gc.disable()  # only reference counting frees what follows: a cycle would keep the graphs alive
    try:
        outcome = cpu_run(cpu_cfg(data_dir, epochs=1), data_dir)
        del outcome
        assert capturer.owners and all(owner() is None for owner in capturer.owners)
    finally:
        gc.enable()
    assert all(graph.step is None for graph in capturer.graphs)  # released explicitly
    assert capturer.collector_enabled == [False, False]  # no collection inside a capture
    assert gc.isenabled()


def test_a_failing_capture_turns_graphs_off_with_one_line_and_training_goes_on(
        data_dir: Path, graphs_on_cpu, caplog: pytest.LogCaptureFixture):
    cfg = cpu_cfg(data_dir)
    eager = cpu_run(validate({**to_dict(cfg), "train": {**to_dict(cfg)["train"],
                                                        "cuda_graphs": False}}), data_dir)
    capturer = graphs_on_cpu(FailingCapture())
    with caplog.at_level(logging.WARNING, logger="fmnist_hpo"):
        first = cpu_run(cfg, data_dir)
        second = cpu_run(cfg, data_dir)  # the next trial of the process does not try again
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("CUDA graphs off for this process, training eagerly: capture failed: "
                                                   "RuntimeError: CUDA error: operation not permitted"), lines
    assert len(capturer.collector_enabled) == 1 and gc.isenabled()
    assert losses(first) == pytest.approx(losses(eager), rel=1e-4)
    assert losses(second) == pytest.approx(losses(first), rel=1e-4)  # plain Adam now, not the capturable one


def test_a_first_replay_that_disagrees_with_eager_turns_graphs_off(data_dir: Path, graphs_on_cpu,
                                                                   caplog: pytest.LogCaptureFixture):
    cfg = cpu_cfg(data_dir, dropout=False)
    eager = cpu_run(validate({**to_dict(cfg), "train": {**to_dict(cfg)["train"],
                                                        "cuda_graphs": False}}), data_dir)
    capturer = graphs_on_cpu(DisagreeingCapture())
    with caplog.at_level(logging.WARNING, logger="fmnist_hpo"):
        outcome = cpu_run(cfg, data_dir)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "the first graphed training step disagrees with the same step run eagerly" in lines[0]
    assert capturer.graphs[0].replays == 1 and capturer.graphs[0].step is None  # checked once, then released
    assert losses(outcome) == pytest.approx(losses(eager), rel=1e-4)  # the checked step was run again eagerly


def test_under_true_a_failing_graph_fails_the_trial(data_dir: Path, graphs_on_cpu):
    graphs_on_cpu(FailingCapture())
    cfg = cpu_cfg(data_dir)
    model, engine = prepare_trial(cfg, CPU)
    engine.graphs_required = True  # train.cuda_graphs: true, which config validation allows on CUDA only
    with pytest.raises(graphs.GraphError, match=r"train\.cuda_graphs: true: capture failed"):
        fit(model, make_splits(load_dataset(cfg.data), cfg.data, CPU), cfg, engine)
    assert graphs.turned_off() is None and gc.isenabled()


def test_a_replaced_learning_rate_tensor_is_refused(graphs_on_cpu):
    graphs_on_cpu(RecordingCapture())
    model = torch.nn.Linear(4, 3)
    optimizer = graphs.make_capturable_adam(model.parameters(), 1e-2, 0.0, CPU)
    x, y = torch.randn(8, 4), torch.arange(8) % 3
    step = graphs.GraphedTraining(model, optimizer, x, y, 0.0, None)
    step.replay(x, y)
    assert step.checked and step.check_figures["update_ratio"] < 1e-6
    optimizer.param_groups[0]["lr"] = 5e-3  # what a scheduler did on torch < 2.4
    before = model.weight.detach().clone()
    with pytest.raises(graphs.GraphError, match="learning-rate tensor"):
        step.replay(x, y)
    assert torch.equal(model.weight, before)
    with pytest.raises(graphs.GraphError, match="float"):
        graphs.GraphedTraining(model, optimizer, x, y, 0.0, None)


def test_freeing_memory_after_a_failed_trial_survives_a_confused_allocator(monkeypatch: pytest.MonkeyPatch):
    from fmnist_hpo.search import sweep

    def asserting(*_args):
        raise RuntimeError("captures_underway.empty() INTERNAL ASSERT FAILED")

    monkeypatch.setattr(torch.cuda, "empty_cache", asserting)
    sweep._free_device_memory(CUDA)  # the sweep's except clause: the next trial still runs


def cuda_run(data_dir: Path, graphs: bool, model: dict | None = None, hooks=None, resume=None, **loop):
    raw = tiny_raw(data_dir, model=model or {}, data={"augment_flip": True, "augment_translate": 2},
                   train={"device": "cuda", "precision": "bf16", "cuda_graphs": graphs, **loop})
    cfg = validate(raw)
    splits = make_splits(load_dataset(cfg.data), cfg.data, CUDA)
    return train_and_test(cfg, splits, CUDA, hooks, resume)


@needs_cuda
def test_captured_training_follows_the_eager_loss_curve(data_dir: Path):
    # dropout off: the warm-up before capture draws from the CUDA generator, so masks would differ
    no_dropout = {"conv_dropout": 0.0, "dense1_dropout": 0.0, "dense2_dropout": 0.0}
    loop = {"epochs": 4, "scheduler": "step", "step_size": 1, "gamma": 0.7, "batch_size": 48}
    eager = cuda_run(data_dir, False, no_dropout, **loop)
    graphed = cuda_run(data_dir, True, no_dropout, **loop)
    eager_losses = torch.tensor([m.train_loss for m in eager.fit.history])
    graphed_losses = torch.tensor([m.train_loss for m in graphed.fit.history])
    assert torch.allclose(graphed_losses, eager_losses, rtol=0.05), (eager_losses, graphed_losses)
    assert [m.lr for m in graphed.fit.history] == pytest.approx([m.lr for m in eager.fit.history])
    assert abs(graphed.test_accuracy - eager.test_accuracy) <= 0.05


@needs_cuda
def test_captured_training_with_dropout_augmentation_and_one_cycle_learns(data_dir: Path):
    outcome = cuda_run(data_dir, True, epochs=4, scheduler="onecycle", batch_size=48)
    losses = [m.train_loss for m in outcome.fit.history]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert len({m.lr for m in outcome.fit.history}) > 1


@needs_cuda
def test_a_captured_run_resumes_from_its_saved_state(data_dir: Path):
    kept = KeepStates()
    whole = cuda_run(data_dir, True, hooks=kept, epochs=3, scheduler="cosine")
    resumed = cuda_run(data_dir, True, resume=kept.states[0], epochs=3, scheduler="cosine")
    assert [m.epoch for m in resumed.fit.history] == [0, 1, 2]
    assert [m.lr for m in resumed.fit.history] == pytest.approx([m.lr for m in whole.fit.history])
    # the warm-up gives the generator back: the same dropout masks, up to nondeterministic atomics
    assert resumed.fit.history[-1].train_loss == pytest.approx(whole.fit.history[-1].train_loss, rel=1e-2)
