import platform
from pathlib import Path

import pytest
import torch
from conftest import tiny_raw

from fmnist_hpo.config.sections import validate
from fmnist_hpo.data.datasets import FASHION_MNIST
from fmnist_hpo.data.loading import load_dataset
from fmnist_hpo.data.splits import make_splits
from fmnist_hpo.selection import kept_epoch
from fmnist_hpo.training.batches import augment, normalize
from fmnist_hpo.training.device import resolve_device
from fmnist_hpo.training.hooks import FitHooks
from fmnist_hpo.training.loop import EarlyStopping, TrialDiverged, evaluate, make_engine, train_and_test

CPU = torch.device("cpu")


def tiny_run(data_dir: Path, **sections):
    cfg = validate(tiny_raw(data_dir, **sections))
    splits = make_splits(load_dataset(cfg.data), cfg.data, CPU)
    return train_and_test(cfg, splits, CPU)


def test_early_stopping_counts_epochs_without_improvement():
    stopper = EarlyStopping(patience=2, min_delta=0.01, maximize=False)
    assert stopper.update(1.0, 0)
    assert stopper.update(0.9, 1)
    assert not stopper.update(0.895, 2)  # within min_delta: not an improvement
    assert not stopper.should_stop
    assert not stopper.update(0.95, 3)
    assert stopper.should_stop and stopper.best_epoch == 1 and stopper.best == 0.9


def test_early_stopping_maximises_accuracy_and_can_be_off():
    stopper = EarlyStopping(patience=None, min_delta=0.0, maximize=True)
    for epoch, value in enumerate([0.5, 0.7, 0.6, 0.6, 0.6]):
        stopper.update(value, epoch)
    assert stopper.best_epoch == 1 and not stopper.should_stop


def test_smoke_run_learns_and_restores_the_best_epoch(data_dir: Path):
    outcome = tiny_run(data_dir, train={"epochs": 4})
    losses = [m.train_loss for m in outcome.fit.history]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    best = max(outcome.fit.history, key=lambda m: (m.val_accuracy, -m.epoch))  # search.metric: val_accuracy
    assert outcome.fit.kept_epoch == best.epoch
    assert 0.0 <= outcome.test_accuracy <= 1.0


@pytest.mark.parametrize("metric", ["val_accuracy", "val_loss"])
def test_kept_epoch_follows_the_search_metric_not_the_early_stopping_monitor(data_dir: Path, metric: str):
    monitor = "val_loss" if metric == "val_accuracy" else "val_accuracy"
    cfg = validate(tiny_raw(data_dir, train={"epochs": 5, "lr": 2e-2, "monitor": monitor, "patience": 5},
                            search={"metric": metric}))
    splits = make_splits(load_dataset(cfg.data), cfg.data, CPU)
    outcome = train_and_test(cfg, splits, CPU)
    history = outcome.fit.history
    assert outcome.fit.kept_epoch == kept_epoch(history, metric)
    # the kept weights are that epoch's: re-scoring the validation split gives its figures exactly
    engine = make_engine(cfg.train, CPU, 0, FASHION_MNIST)
    val_loss, val_acc = evaluate(outcome.model, splits.val, engine, cfg.train.eval_batch_size)
    assert (val_loss, val_acc) == (history[outcome.fit.kept_epoch].val_loss, history[outcome.fit.kept_epoch].val_accuracy)


def test_epochs_time_training_and_validation_separately(data_dir: Path):
    history = tiny_run(data_dir, train={"epochs": 2}).fit.history
    for m in history:
        assert m.train_seconds > 0 and m.eval_seconds > 0
        assert m.epoch_seconds >= m.train_seconds + m.eval_seconds
        logged = m.as_dict()
        assert logged["overhead_seconds"] == pytest.approx(m.epoch_seconds - m.train_seconds - m.eval_seconds)
        assert {"train_seconds", "eval_seconds", "epoch_seconds"} <= logged.keys()


def test_metrics_without_the_timing_split_still_load_and_log():
    from fmnist_hpo.records import EpochMetrics

    old = EpochMetrics(0, 1.0, 0.5, 0.9, 0.6, 1e-3, 2.0)  # as tracking and ray_engine build them
    assert old.as_dict() == {"train_loss": 1.0, "train_accuracy": 0.5, "val_loss": 0.9, "val_accuracy": 0.6,
                             "lr": 1e-3, "epoch_seconds": 2.0}


def test_kept_epoch_is_the_first_best_by_the_metric():
    from fmnist_hpo.records import EpochMetrics

    history = [EpochMetrics(i, 1.0, 0.5, loss, acc, 1e-3, 1.0)
               for i, (loss, acc) in enumerate([(0.5, 0.80), (0.3, 0.85), (0.4, 0.90), (0.6, 0.90)])]
    assert kept_epoch(history, "val_accuracy") == 2
    assert kept_epoch(history, "val_loss") == 1
    assert kept_epoch([], "val_loss") == -1


def test_patience_stops_training_early(data_dir: Path):
    # lr so small that val loss barely moves: min_delta makes every epoch a non-improvement
    outcome = tiny_run(data_dir, train={"epochs": 6, "lr": 1e-7, "patience": 2, "min_delta": 1.0})
    assert len(outcome.fit.history) == 3 and outcome.fit.stopped_early and outcome.fit.kept_epoch == 0


def test_same_seed_same_metrics(data_dir: Path):
    first, second = tiny_run(data_dir, train={"epochs": 2}), tiny_run(data_dir, train={"epochs": 2})
    assert [m.val_loss for m in first.fit.history] == [m.val_loss for m in second.fit.history]
    assert first.test_accuracy == second.test_accuracy
    other = tiny_run(data_dir, train={"epochs": 2, "seed": 7})
    assert [m.val_loss for m in other.fit.history] != [m.val_loss for m in first.fit.history]


@pytest.mark.parametrize("scheduler", ["step", "cosine", "onecycle"])
def test_schedules_move_the_learning_rate(data_dir: Path, scheduler: str):
    outcome = tiny_run(data_dir, train={"epochs": 3, "scheduler": scheduler, "step_size": 1, "gamma": 0.5})
    lrs = [m.lr for m in outcome.fit.history]
    assert len(set(lrs)) > 1


def test_a_diverging_trial_raises(data_dir: Path, monkeypatch: pytest.MonkeyPatch):
    from fmnist_hpo.training import model as model_module

    real_build = model_module.build_model

    def poisoned_build(cfg, info):
        model = real_build(cfg, info)
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        return model

    monkeypatch.setattr(model_module, "build_model", poisoned_build)
    with pytest.raises(TrialDiverged, match="training loss became nan at epoch 0"):
        tiny_run(data_dir)


def test_augmentation_keeps_shape_and_changes_pixels(data_dir: Path):
    cfg = validate({"data": {"augment_flip": True, "augment_translate": 2, "augment_erase": 1.0}}).data
    x = normalize(torch.randint(0, 255, (16, 1, 28, 28), dtype=torch.uint8), FASHION_MNIST)
    out = augment(x, cfg, torch.Generator().manual_seed(0), FASHION_MNIST)
    assert out.shape == x.shape and not torch.equal(out, x)
    assert (out == 0).any()  # erased patches are set to the (normalised) mean


def test_translation_brings_in_black_background_not_grey():
    cfg = validate({"data": {"augment_translate": 3}}).data
    x = normalize(torch.full((64, 1, 28, 28), 200, dtype=torch.uint8), FASHION_MNIST)
    out = augment(x, cfg, torch.Generator().manual_seed(0), FASHION_MNIST)
    black = normalize(torch.zeros(1, dtype=torch.uint8), FASHION_MNIST).item()
    shifted = out != x
    assert shifted.any() and torch.allclose(out[shifted], torch.tensor(black))


def test_onecycle_counts_only_the_batches_that_run():
    from fmnist_hpo.training.batches import batches, steps_per_epoch

    for n, size in [(401, 50), (400, 50), (1, 64), (65, 64), (66, 64)]:
        ran = sum(1 for _ in batches(n, size, torch.Generator().manual_seed(0), CPU))
        assert steps_per_epoch(n, size) == max(1, ran)


def test_unavailable_device_is_a_clear_error():
    from fmnist_hpo.errors import DeviceError

    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="'cuda' is not available"):
            resolve_device("cuda")
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    assert resolve_device("cpu") == CPU


def test_bf16_autocast_trains_to_the_same_accuracy_as_fp32(data_dir: Path):
    fp32 = tiny_run(data_dir, train={"epochs": 4, "precision": "fp32"})
    bf16 = tiny_run(data_dir, train={"epochs": 4, "precision": "bf16"})
    assert abs(bf16.test_accuracy - fp32.test_accuracy) <= 0.1
    assert bf16.fit.history[-1].train_loss < bf16.fit.history[0].train_loss


def test_fp16_is_refused_on_cpu():
    from fmnist_hpo.errors import DeviceError
    from fmnist_hpo.training.device import resolve_precision

    with pytest.raises(DeviceError, match="fp16 needs cuda or mps"):
        resolve_precision("fp16", CPU)
    assert resolve_precision("bf16", CPU) == torch.bfloat16


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, None)])
def test_auto_precision_on_cpu_is_bf16_only_where_the_cpu_has_native_bf16(monkeypatch: pytest.MonkeyPatch, native, expected):
    from fmnist_hpo.training import device

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": native, "amx_bf16": False})
    assert device.cpu_has_native_bf16() is native
    assert device.resolve_precision("auto", CPU) == expected
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert device.resolve_precision("auto", CPU) is None


def test_cpu_evaluation_scores_a_folded_copy_and_leaves_the_model_in_eval_mode(monkeypatch: pytest.MonkeyPatch):
    from fmnist_hpo.data.splits import Split
    from fmnist_hpo.training import loop
    from fmnist_hpo.training.model import build_model, folded_batchnorm

    torch.manual_seed(0)
    model = build_model(validate({"model": {"filters": 6, "units1": 8, "units2": 8}}).model, FASHION_MNIST)
    with torch.no_grad():
        model.train()(torch.randn(64, 1, 28, 28))  # running statistics of their own
    state = {k: v.clone() for k, v in model.state_dict().items()}
    split = Split(torch.randint(0, 256, (300, 1, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (300,)))
    engine = make_engine(validate({"train": {"precision": "fp32"}}).train, CPU, 0, FASHION_MNIST)
    folds = []
    monkeypatch.setattr(loop, "folded_batchnorm", lambda m: folds.append(m) or folded_batchnorm(m))
    loss, accuracy = evaluate(model, split, engine, batch_size=128)
    assert folds == [model] and not model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    unfolded_loss, unfolded_accuracy = loop._evaluate_eagerly(model, split, engine, 128)
    assert loss == pytest.approx(unfolded_loss, rel=1e-5) and accuracy == unfolded_accuracy
    engine.compiled = True  # a torch.compile'd model is scored as it is
    evaluate(model, split, engine, batch_size=128)
    assert len(folds) == 1


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_cpu_engine_keeps_activation_buffers_on_glibcs_heap():
    from fmnist_hpo.training.device import keep_cpu_buffers

    keep_cpu_buffers.cache_clear()
    make_engine(validate({}).train, CPU, 0, FASHION_MNIST)
    assert keep_cpu_buffers.cache_info().currsize == 1  # the engine asked for it
    assert keep_cpu_buffers() is True  # and glibc took both thresholds


def test_progress_within_an_epoch_is_reported_without_changing_the_result(data_dir: Path):
    cfg = validate(tiny_raw(data_dir, train={"epochs": 2, "batch_size": 8}))
    splits = make_splits(load_dataset(cfg.data), cfg.data, CPU)
    heard: list[tuple[int, int]] = []

    class Listen(FitHooks):
        def steps_done(self, done: int, total: int) -> None:
            heard.append((done, total))

    with_progress = train_and_test(cfg, splits, CPU, Listen())
    plain = train_and_test(cfg, splits, CPU)
    total = heard[0][1]
    assert total == 38  # 300 training images in batches of 8 (the last, of 4, runs)
    assert heard.count((total, total)) == 2 and all(0 < done <= total for done, _ in heard)
    assert [m.val_loss for m in with_progress.fit.history] == [m.val_loss for m in plain.fit.history]
