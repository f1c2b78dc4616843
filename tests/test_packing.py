"""search.parallel: auto -> how many trials share a GPU (the pure rule on CPU; the measurement on CUDA)."""

from pathlib import Path

import pytest
import torch
from conftest import tiny_raw

from fmnist_hpo.config.sections import sequential_only, validate
from fmnist_hpo.errors import ConfigError
from fmnist_hpo.search.packing import INSTALL_RAY, MAX_TRIALS_PER_GPU, resolve_parallel, step_peak_bytes

GIB = 2**30


def test_a_number_is_taken_as_it_is():
    assert resolve_parallel(3, "cpu") == (3, None)
    assert resolve_parallel(1, "cuda", footprint_bytes=GIB, free_bytes=100 * GIB, ray_available=True) == (1, None)


@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_auto_is_one_trial_off_cuda(device: str):
    assert resolve_parallel("auto", device, footprint_bytes=GIB, free_bytes=100 * GIB, ray_available=True) == (1, None)


def test_auto_without_ray_is_one_trial_and_says_how_to_install_it():
    trials, note = resolve_parallel("auto", "cuda", footprint_bytes=GIB, free_bytes=100 * GIB, ray_available=False)
    assert trials == 1 and INSTALL_RAY in note


def test_auto_packs_free_memory_by_the_footprint():
    trials, note = resolve_parallel("auto", "cuda", footprint_bytes=4 * GIB, free_bytes=20 * GIB,
                                    ray_available=True, cpu_count=16)
    assert trials == 4  # 20 GiB * 0.85 headroom // 4 GiB
    assert "4 trials" in note and "4.00 GiB each" in note


def test_auto_is_capped_by_compute_cores_and_never_below_one():
    many = dict(footprint_bytes=GIB // 4, free_bytes=100 * GIB, ray_available=True)
    assert resolve_parallel("auto", "cuda", cpu_count=64, **many)[0] == MAX_TRIALS_PER_GPU
    assert resolve_parallel("auto", "cuda", cpu_count=64, gpu_count=2, **many)[0] == 2 * MAX_TRIALS_PER_GPU
    assert resolve_parallel("auto", "cuda", cpu_count=3, **many)[0] == 3
    tight = resolve_parallel("auto", "cuda", footprint_bytes=8 * GIB, free_bytes=2 * GIB, ray_available=True, cpu_count=8)
    assert tight[0] == 1


def test_auto_without_a_measurement_is_one_trial():
    trials, note = resolve_parallel("auto", "cuda", ray_available=True)
    assert trials == 1 and "could not be measured" in note


def test_searches_that_run_sequentially_make_auto_one_trial():
    grid = validate({"search": {"algo": "grid", "parallel": "auto"}}).search
    reason = sequential_only(grid)
    assert reason is not None and "grid" in reason
    trials, note = resolve_parallel(grid.parallel, "cuda", footprint_bytes=GIB, free_bytes=100 * GIB,
                                    ray_available=True, sequential_reason=reason)
    assert trials == 1 and "grid" in note
    assert sequential_only(validate({"search": {"algo": "tpe"}}).search) is None


def test_auto_is_the_default_and_keeps_sequential_only_settings_valid():
    assert validate({}).search.parallel == "auto"
    cfg = validate({"search": {"algo": "anneal", "repeats": 3}})
    assert cfg.search.parallel == "auto"
    with pytest.raises(ConfigError, match="repeats run on the sequential engine only"):
        validate({"search": {"parallel": 2, "repeats": 3}})
    with pytest.raises(ConfigError, match=r"must be >= 1"):
        validate({"search": {"parallel": 0}})


def test_parallel_for_measures_nothing_where_auto_means_one(monkeypatch: pytest.MonkeyPatch):
    from fmnist_hpo.search import packing

    def no_measuring(*_args):
        raise AssertionError("measured a trial where auto is 1 anyway")

    monkeypatch.setattr(packing, "trial_footprint", no_measuring)
    cpu = torch.device("cpu")
    assert packing.parallel_for(validate({}), cpu, dataset=None) == (1, None)
    assert packing.parallel_for(validate({"search": {"parallel": 2}}), cpu, dataset=None) == (2, None)
    trials, note = packing.parallel_for(validate({"search": {"algo": "grid"}}), torch.device("cuda"), dataset=None)
    assert trials == 1 and "grid" in note


@pytest.mark.skipif(not torch.cuda.is_available(), reason="measures CUDA memory")
def test_step_peak_bytes_grows_with_the_batch(data_dir: Path):
    small = validate(tiny_raw(data_dir, train={"device": "cuda", "batch_size": 32, "eval_batch_size": 32}))
    large = validate(tiny_raw(data_dir, train={"device": "cuda", "batch_size": 512, "eval_batch_size": 512}))
    cuda = torch.device("cuda")
    assert 0 < step_peak_bytes(small, cuda) < step_peak_bytes(large, cuda)


def test_a_sweep_of_one_trial_measures_nothing(monkeypatch: pytest.MonkeyPatch):
    """fast.yaml's empty space runs one trial: no capture, no graphs held, before it even starts."""
    from fmnist_hpo.search import packing

    def no_measuring(*_args):
        raise AssertionError("measured a trial for a sweep of one")

    monkeypatch.setattr(packing, "trial_footprint", no_measuring)
    monkeypatch.setattr(packing, "ray_installed", lambda: True)
    cuda = torch.device("cuda")
    assert packing.parallel_for(validate({}), cuda, dataset=None) == (1, None)
    one_point = {"search": {"max_evals": 1, "space": {"train.lr": {"loguniform": [1e-4, 1e-2]}}}}
    assert packing.parallel_for(validate(one_point), cuda, dataset=None) == (1, None)


def test_a_large_space_is_measured_at_its_largest_model():
    from fmnist_hpo.search.packing import footprint_variants

    cfg = validate({"search": {"max_evals": 20, "space": {
        "model.filters": {"choice": [16, 32, 64, 128, 256, 512, 1024]},
        "train.batch_size": {"quniform": [32, 512, 32]},
        "model.architecture": {"choice": ["cnn", "dual_path"]},
        "train.lr": {"loguniform": [1e-4, 1e-2]}}}})
    assert [(v.model.filters, v.train.batch_size, v.model.architecture) for v in footprint_variants(cfg)] == [
        (1024, 512, "cnn"), (1024, 512, "dual_path")]
    few = validate({"search": {"max_evals": 4, "space": {"model.filters": {"choice": [16, 32]}}}})
    assert [v.model.filters for v in footprint_variants(few)] == [16, 32]
