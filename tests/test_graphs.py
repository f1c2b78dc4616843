"""train.cuda_graphs: when steps are captured, and (on CUDA only) that captured training matches eager."""

import copy
from pathlib import Path

import pytest
import torch
from conftest import tiny_raw

from fmnist_hpo import config, graphs
from fmnist_hpo.data import load_dataset, make_splits
from fmnist_hpo.errors import ConfigError, DeviceError
from fmnist_hpo.train import make_engine, resolve_cuda_graphs, train_and_test

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
    with pytest.raises(ConfigError, match=r"cuda_graphs: true needs a CUDA device, got train.device: cpu"):
        config.validate({"train": {"cuda_graphs": True, "device": "cpu"}})
    with pytest.raises(ConfigError, match="exclusive"):
        config.validate({"train": {"cuda_graphs": True, "compile": True}})


def test_the_cpu_engine_does_not_capture():
    engine = make_engine(config.validate({"train": {"cuda_graphs": "auto"}}).train, CPU, 0)
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


def cuda_run(data_dir: Path, graphs: bool, model: dict | None = None, save_state=None, resume=None, **train):
    raw = tiny_raw(data_dir, model=model or {}, data={"augment_flip": True, "augment_translate": 2},
                   train={"device": "cuda", "precision": "bf16", "cuda_graphs": graphs, **train})
    cfg = config.validate(raw)
    splits = make_splits(load_dataset(cfg.data), cfg.data, CUDA)
    return train_and_test(cfg, splits, CUDA, save_state=save_state, resume=resume)


@needs_cuda
def test_captured_training_follows_the_eager_loss_curve(data_dir: Path):
    # dropout off: the warm-up before capture draws from the CUDA generator, so masks would differ
    no_dropout = {"conv_dropout": 0.0, "dense1_dropout": 0.0, "dense2_dropout": 0.0}
    train = {"epochs": 4, "scheduler": "step", "step_size": 1, "gamma": 0.7, "batch_size": 48}
    eager = cuda_run(data_dir, False, no_dropout, **train)
    graphed = cuda_run(data_dir, True, no_dropout, **train)
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
    states = []
    whole = cuda_run(data_dir, True, save_state=lambda s: states.append(copy.deepcopy(s)), epochs=3, scheduler="cosine")
    resumed = cuda_run(data_dir, True, resume=states[0], epochs=3, scheduler="cosine")
    assert [m.epoch for m in resumed.fit.history] == [0, 1, 2]
    assert [m.lr for m in resumed.fit.history] == pytest.approx([m.lr for m in whole.fit.history])
    assert resumed.fit.history[-1].train_loss == pytest.approx(whole.fit.history[-1].train_loss, rel=0.1)
