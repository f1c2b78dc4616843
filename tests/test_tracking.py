"""The Tracker's MLflow records that a sweep asks for: logged models, dataset lineage, system metrics."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import torch
from conftest import write_dataset
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from fmnist_hpo.config.loading import to_dict
from fmnist_hpo.config.sections import validate
from fmnist_hpo.data.datasets import FASHION_MNIST
from fmnist_hpo.data.lineage import idx_digest
from fmnist_hpo.errors import ConfigError
from fmnist_hpo.tags import ROLE, Role
from fmnist_hpo.tracking.provenance import model_requirements
from fmnist_hpo.tracking.reader import StoreView, logged_trial
from fmnist_hpo.tracking.registry import log_trial_model
from fmnist_hpo.tracking.store import fluent_tracking_uri
from fmnist_hpo.tracking.writer import Tracker
from fmnist_hpo.training.checkpoints import save_checkpoint
from fmnist_hpo.training.model import build_model, with_normalization

TINY_MODEL = {"num_blocks": 2, "filters": 4, "units1": 8, "units2": 8}


@pytest.fixture
def tracker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Tracker:
    monkeypatch.chdir(tmp_path)  # a SQLite store's artifacts go to ./mlruns: never into the checkout
    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "tracked")


@pytest.fixture
def finished_run(tracker: Tracker) -> str:
    run_id = tracker.start_run("trial-000", {"model.filters": 4}, {"fmnist.role": "trial"})
    tracker.end_run(run_id, "FINISHED")
    return run_id


def tiny_checkpoint(folder: Path, run_id: str) -> tuple[Path, torch.nn.Module]:
    model_config = validate({"model": TINY_MODEL}).model
    torch.manual_seed(0)
    model = build_model(model_config, FASHION_MNIST).eval()
    path = save_checkpoint(folder / f"{run_id}.pt", model, to_dict(validate({"model": TINY_MODEL}))["model"],
                           FASHION_MNIST, run_id=run_id, kept_epoch=1)
    return path, with_normalization(model, FASHION_MNIST)


def load_logged(tracker: Tracker, uri: str) -> torch.nn.Module:
    with fluent_tracking_uri(tracker.tracking_uri):
        return mlflow.pytorch.load_model(uri)


def test_a_logged_model_leaves_its_finished_run_as_it_was(tracker: Tracker, finished_run: str, tmp_path: Path):
    before = tracker.client.get_run(finished_run).info
    checkpoint, _ = tiny_checkpoint(tmp_path, finished_run)
    uri = log_trial_model(tracker, finished_run, checkpoint)
    after = tracker.client.get_run(finished_run)
    assert (after.info.status, after.info.end_time) == (before.status, before.end_time) == ("FINISHED", before.end_time)
    assert mlflow.active_run() is None
    assert after.data.tags["model_uri"] == uri
    logged = tracker.client.get_logged_model(uri.removeprefix("models:/"))
    assert (logged.source_run_id, logged.status) == (finished_run, LoggedModelStatus.READY)
    assert [o.model_id for o in after.outputs.model_outputs] == [logged.model_id]


def test_a_logged_model_is_filed_in_its_runs_experiment(tracker: Tracker, finished_run: str, tmp_path: Path):
    checkpoint, _ = tiny_checkpoint(tmp_path, finished_run)
    uri = log_trial_model(tracker, finished_run, checkpoint)
    client = MlflowClient(tracker.tracking_uri)  # read back as someone who did not write the code would
    listed = client.search_logged_models(experiment_ids=[tracker.experiment_id])
    assert [f"models:/{m.model_id}" for m in listed] == [uri]
    assert listed[0].experiment_id == tracker.experiment_id and listed[0].source_run_id == finished_run
    assert listed[0].params["model.filters"] == "4"
    # MLflow's own Default experiment stays (fluent mlflow.start_run() needs it) and holds nothing of ours
    assert not client.search_logged_models(experiment_ids=["0"]) and not client.search_runs(["0"])
    assert client.get_experiment("0").lifecycle_stage == "active"


def test_an_interrupted_model_logging_is_cleaned_up_when_logged_again(tracker: Tracker, finished_run: str,
                                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    checkpoint, _ = tiny_checkpoint(tmp_path, finished_run)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mlflow.pytorch, "log_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        log_trial_model(tracker, finished_run, checkpoint)
    models = tracker.client.search_logged_models([tracker.experiment_id])
    assert [m.status for m in models] == [LoggedModelStatus.PENDING]
    monkeypatch.undo()
    uri = log_trial_model(tracker, finished_run, checkpoint)
    models = tracker.client.search_logged_models([tracker.experiment_id])
    assert [(f"models:/{m.model_id}", m.status) for m in models] == [(uri, LoggedModelStatus.READY)]
    assert log_trial_model(tracker, finished_run, checkpoint) == uri  # logged once, kept


def test_a_logged_model_has_a_signature_and_pinned_requirements(tracker: Tracker, finished_run: str, tmp_path: Path):
    checkpoint, _ = tiny_checkpoint(tmp_path, finished_run)
    uri = log_trial_model(tracker, finished_run, checkpoint)
    logged = tracker.client.get_logged_model(uri.removeprefix("models:/"))
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=logged.artifact_location, dst_path=str(tmp_path / "m")))
    info = mlflow.models.Model.load(folder)
    requirements = folder / "requirements.txt"
    signature = info.signature.to_dict()
    assert json.loads(signature["inputs"]) == [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 1, 28, 28]}}]
    assert json.loads(signature["outputs"]) == [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 10]}}]
    assert sorted(p.name for p in (folder / "data").iterdir()) == ["model.pt2"]  # an exported program: pickle-free
    assert requirements.read_text().split() == model_requirements()
    assert f"torch=={torch.__version__.split('+')[0]}" in model_requirements()


def test_a_logged_model_loads_and_predicts_like_the_checkpoint(tracker: Tracker, finished_run: str, tmp_path: Path):
    checkpoint, original = tiny_checkpoint(tmp_path, finished_run)
    loaded = load_logged(tracker, log_trial_model(tracker, finished_run, checkpoint))
    images = torch.rand(5, 1, 28, 28)  # a batch size the export never saw
    with torch.inference_mode():
        assert torch.allclose(loaded(images), original(images), atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_logged_model_predicts_on_cuda(tracker: Tracker, finished_run: str, tmp_path: Path):
    checkpoint, original = tiny_checkpoint(tmp_path, finished_run)
    loaded = load_logged(tracker, log_trial_model(tracker, finished_run, checkpoint)).to("cuda")
    images = torch.rand(5, 1, 28, 28)
    with torch.inference_mode():
        assert torch.allclose(loaded(images.cuda()).cpu(), original(images), atol=1e-4)


def test_the_idx_digest_covers_contents_not_compression(tmp_path: Path):
    gzipped = write_dataset(tmp_path / "gz", n_train=40, n_test=10)
    plain = write_dataset(tmp_path / "plain", n_train=40, n_test=10, compress=False)
    other = write_dataset(tmp_path / "other", n_train=50, n_test=10)
    assert idx_digest(gzipped, FASHION_MNIST) == idx_digest(plain, FASHION_MNIST) != idx_digest(other, FASHION_MNIST)
    assert len(idx_digest(gzipped, FASHION_MNIST)) == 32
    any_file = next(plain.iterdir())
    any_file.write_bytes(any_file.read_bytes()[:-1] + b"\x01")
    assert idx_digest(plain, FASHION_MNIST) != idx_digest(gzipped, FASHION_MNIST)


def test_datasets_are_the_runs_inputs_with_their_split(tracker: Tracker, finished_run: str, tmp_path: Path):
    root = write_dataset(tmp_path / "data", n_train=40, n_test=10)
    digest = idx_digest(root, FASHION_MNIST)
    sizes = {"train": 30, "validation": 10, "test": 10}
    tracker.log_datasets(finished_run, "fashion-mnist", digest, str(root), split_seed=3, sizes=sizes)
    inputs = tracker.client.get_run(finished_run).inputs.dataset_inputs
    by_context = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in inputs}
    assert set(by_context) == set(sizes)
    for split, dataset in by_context.items():
        profile = json.loads(dataset.profile)
        assert (dataset.name, profile["files_digest"], profile["split_seed"], profile["num_examples"]) == (
            "fashion-mnist", digest, 3, sizes[split])
        assert json.loads(dataset.source)["uri"] == str(root)
    assert len({d.digest for d in by_context.values()}) == 3
    # a resumed trial logs again
    tracker.log_datasets(finished_run, "fashion-mnist", digest, str(root), split_seed=3, sizes=sizes)
    assert len(tracker.client.get_run(finished_run).inputs.dataset_inputs) == 3
    other_run = tracker.start_run("trial-001", {}, {})
    tracker.log_datasets(other_run, "fashion-mnist", digest, str(root), split_seed=4, sizes=sizes)
    other = {i.dataset.digest for i in tracker.client.get_run(other_run).inputs.dataset_inputs}
    assert other.isdisjoint(d.digest for d in by_context.values())  # another seed, other splits
    read = logged_trial(tracker.client.get_run(finished_run), "tracked")
    assert read.data_digest == digest and "data_digest" not in read.tags
    mnist_run = tracker.start_run("trial-002", {}, {})
    tracker.log_datasets(mnist_run, "mnist", digest, str(root), split_seed=3, sizes=sizes)
    assert {i.dataset.name for i in tracker.client.get_run(mnist_run).inputs.dataset_inputs} == {"mnist"}


def test_a_step_logged_twice_reads_back_as_its_last_value_everywhere(tracker: Tracker):
    """A resumed epoch logs its step again: the writer's and the readers' histories all keep the later value."""
    run_id = tracker.start_run("trial-000", {}, {ROLE: Role.TRIAL})
    epoch = {"train_loss": 1.0, "train_accuracy": 0.5, "val_loss": 1.0, "val_accuracy": 0.5, "lr": 0.1,
             "epoch_seconds": 2.0}
    tracker.log_metrics(run_id, epoch, step=0)
    time.sleep(0.01)  # a later timestamp
    tracker.log_metrics(run_id, {**epoch, "val_accuracy": 0.7}, step=0)
    tracker.end_run(run_id)
    assert [m.val_accuracy for m in tracker.history(run_id)] == [0.7]
    assert StoreView(tracker.tracking_uri).history(run_id, "val_accuracy") == {0: 0.7}


@pytest.mark.skipif(importlib.util.find_spec("psutil") is None, reason="MLflow's system metrics need psutil")
def test_system_metrics_are_logged_while_the_block_runs(tracker: Tracker):
    run_id = tracker.start_run("trial-000", {}, {})
    with tracker.system_metrics(run_id, sampling_seconds=0.2):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(
                k.startswith("system/cpu") for k in tracker.client.get_run(run_id).data.metrics):
            time.sleep(0.2)
    metrics = tracker.client.get_run(run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics
    assert tracker.client.get_run(run_id).info.status == "RUNNING"  # the monitor leaves the run to its owner


def test_system_metrics_without_psutil_say_what_to_install(tracker: Tracker, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture):
    from loguru import logger

    from fmnist_hpo.tracking import writer

    monkeypatch.setattr(writer, "missing_system_metrics_packages", lambda: ["psutil"])
    writer._say_once.cache_clear()
    sink = logger.add(lambda message: print(message, end=""), level="WARNING")
    run_id = tracker.start_run("trial-000", {}, {})
    try:
        for _ in range(2):
            with tracker.system_metrics(run_id, sampling_seconds=0.1):
                ran = True
    finally:
        logger.remove(sink)
    assert ran
    assert capsys.readouterr().out.count("system metrics are off: pip install psutil") == 1
    assert not any(k.startswith("system/") for k in tracker.client.get_run(run_id).data.metrics)


def test_system_metrics_is_an_mlflow_setting_off_by_default():
    assert validate({}).mlflow.system_metrics is False
    assert validate({"mlflow": {"system_metrics": True}}).mlflow.system_metrics is True
    with pytest.raises(ConfigError, match=r"mlflow\.system_metrics: must be true or false"):
        validate({"mlflow": {"system_metrics": "yes"}})


def test_exp12_model_exports_in_a_few_seconds(tracker: Tracker, finished_run: str):
    model = with_normalization(build_model(validate({}).model, FASHION_MNIST), FASHION_MNIST)
    start = time.perf_counter()
    tracker.log_pytorch_model(finished_run, model, np.zeros((2, 1, 28, 28), dtype=np.float32), 10)
    assert time.perf_counter() - start < 15  # about 2 s on two busy CPU cores; the old path took 7 s


def test_logging_a_model_leaves_the_default_tracking_uri_unset(tracker: Tracker, finished_run: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(None)
    checkpoint, _ = tiny_checkpoint(tmp_path, finished_run)
    log_trial_model(tracker, finished_run, checkpoint)
    assert not mlflow.tracking.is_tracking_uri_set()  # later fluent calls still resolve from their own folder
