"""Every kind of bad input: exit code 2, one line on stderr, and nothing written to MLflow or models/."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import N_TRAIN, tiny_raw, write_dataset, write_idx
from typer.testing import CliRunner

from fmnist_hpo.cli.app import app
from fmnist_hpo.data.datasets import FILES

runner = CliRunner()


def with_space(data_dir: Path, space: dict, **search) -> dict:
    return tiny_raw(data_dir, search={"max_evals": 2, "space": space, **search})


BAD_SPECS = {
    "unknown key": (lambda d: tiny_raw(d, train={"epochz": 3}), "train.epochz: unknown key (did you mean 'train.epochs'?)"),
    "wrong type": (lambda d: tiny_raw(d, train={"batch_size": "big"}), "train.batch_size: must be an integer"),
    "out of range": (lambda d: tiny_raw(d, model={"dense1_dropout": 1.5}), "model.dense1_dropout: must be < 1"),
    "empty choice": (lambda d: with_space(d, {"model.filters": {"choice": []}}), "choice needs a non-empty list"),
    "low >= high": (lambda d: with_space(d, {"train.lr": {"uniform": [0.1, 0.1]}}), "needs low < high"),
    "search names no key": (lambda d: with_space(d, {"model.width": {"choice": [1, 2]}}), "names no config key"),
    "zero max_evals": (lambda d: tiny_raw(d, search={"max_evals": 0}), "search.max_evals: must be >= 1, got 0"),
    "negative max_evals": (lambda d: tiny_raw(d, search={"max_evals": -3}), "search.max_evals: must be >= 1, got -3"),
    "unknown device": (lambda d: tiny_raw(d, train={"device": "tpu"}), "train.device: must be one of auto, cuda, mps, cpu"),
}


def corrupt(kind: str, root: Path) -> None:
    if kind == "missing":
        next(root.glob(FILES["test_labels"] + "*")).unlink()
    elif kind == "truncated":
        path = next(root.glob(FILES["train_images"] + "*"))
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    elif kind == "mislabelled":
        write_idx(root / FILES["train_labels"], np.zeros(N_TRAIN + 5, dtype=np.uint8))


@pytest.fixture
def workdir(tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with a store that already holds one sweep, to check that bad input leaves it alone."""
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "good.yaml"
    spec.write_text(yaml.safe_dump(tiny_raw(data_dir)))
    assert runner.invoke(app, ["run", str(spec), "--quiet"]).exit_code == 0
    return tmp_path


def snapshot(folder: Path) -> dict[str, str]:
    files = [p for p in folder.rglob("*") if p.is_file() and (p.name.startswith("mlflow.db") or "models" in p.parts
                                                                or "mlruns" in p.parts)]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def expect_rejected(args: list[str], workdir: Path, message: str) -> None:
    before = snapshot(workdir)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output + result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert message in result.stderr
    assert snapshot(workdir) == before


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_bad_specs(case: str, workdir: Path, data_dir: Path):
    make, message = BAD_SPECS[case]
    spec = workdir / "bad.yaml"
    spec.write_text(yaml.safe_dump(make(data_dir)))
    expect_rejected(["run", str(spec)], workdir, f"{spec}: ")
    expect_rejected(["run", str(spec)], workdir, message)


@pytest.mark.parametrize(
    ("text", "message"),
    [(None, "no such file"), ("", "the file is empty"), ("train: {epochs: 3\n", "not valid YAML: line 2, column 1")],
)
def test_unreadable_spec_files(text: str | None, message: str, workdir: Path):
    spec = workdir / "broken.yaml"
    if text is not None:
        spec.write_text(text)
    expect_rejected(["run", str(spec)], workdir, message)


@pytest.mark.parametrize(("kind", "message"), [("missing", "t10k-labels-idx1-ubyte"), ("truncated", "cannot be read"),
                                               ("mislabelled", "labels for 400 images")])
def test_bad_data_files(kind: str, message: str, workdir: Path, tmp_path: Path):
    root = write_dataset(tmp_path / f"data-{kind}")
    corrupt(kind, root)
    spec = workdir / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_raw(root)))
    expect_rejected(["run", str(spec)], workdir, message)


def test_unwritable_models_folder_and_store(workdir: Path, data_dir: Path):
    blocker = workdir / "not-a-folder"
    blocker.write_text("a file where a folder should be")
    spec = workdir / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_raw(data_dir, models_dir=str(blocker / "models"))))
    expect_rejected(["run", str(spec)], workdir, "cannot create the checkpoint folder")
    spec.write_text(yaml.safe_dump(tiny_raw(data_dir, mlflow={"tracking_uri": f"sqlite:///{blocker}/mlflow.db"})))
    expect_rejected(["run", str(spec)], workdir, "cannot create the MLflow store")


def test_unavailable_device(workdir: Path, data_dir: Path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    spec = workdir / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_raw(data_dir)))
    expect_rejected(["run", str(spec), "--device", "cuda"], workdir, "device 'cuda' is not available")


def test_resume_without_an_interrupted_sweep(workdir: Path, data_dir: Path):
    spec = workdir / "good.yaml"
    expect_rejected(["run", str(spec), "--resume"], workdir, "no interrupted sweep of this config")
    expect_rejected(["run", str(spec), "--resume", "--fresh"], workdir, "contradict")


def test_a_mistake_in_set_is_blamed_on_set(tmp_path: Path, data_dir: Path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_raw(data_dir)))
    result = runner.invoke(app, ["run", str(spec), "--set", "train.epoch=3"])
    assert result.exit_code == 2
    assert result.stderr == "error: --set: train.epoch: unknown key (did you mean 'train.epochs'?)\n"
    result = runner.invoke(app, ["run", str(spec), "--set", "trian.epochs=2"])  # the option made the section
    assert result.exit_code == 2
    assert result.stderr == "error: --set: trian: unknown key (did you mean 'train'?)\n"
    result = runner.invoke(app, ["run", str(spec), "--device", "tpu"])
    assert result.exit_code == 2 and result.stderr.startswith("error: --device: train.device: must be one of")


def test_several_problems_are_a_header_and_one_line_each(tmp_path: Path, data_dir: Path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_raw(data_dir, train={"epochs": 0})))
    result = runner.invoke(app, ["validate", str(spec), "--set", "model.filtres=8"])
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"error: {spec} and --set: 2 problems:",
        "  --set: model.filtres: unknown key (did you mean 'model.filters'?)",
        f"  {spec}: train.epochs: must be >= 1, got 0",
    ]


def test_a_folder_given_as_the_spec_says_so(tmp_path: Path):
    result = runner.invoke(app, ["validate", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr == f"error: {tmp_path}: is a directory; give the experiment spec file (YAML) inside it\n"


def test_a_missing_image_is_no_such_file(tmp_path: Path):
    result = runner.invoke(app, ["predict", "some-run-id", str(tmp_path / "shoe.png")])
    assert result.exit_code == 2 and result.stderr == f"error: {tmp_path / 'shoe.png'}: no such file\n"


def test_a_failed_download_says_why_and_removes_what_it_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import torchvision.datasets

    def offline(root: str, train: bool, download: bool) -> None:
        print("Downloading https://mirror/train-images-idx3-ubyte.gz")
        print("Failed to download (trying next):\n<urlopen error [Errno -3] Temporary failure in name resolution>")
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    existing = tmp_path / "existing"
    existing.mkdir()
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_raw(existing / "new" / "data", data={"download": True})))
    result = runner.invoke(app, ["run", str(spec)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert ("could not be downloaded (Error downloading train-images-idx3-ubyte.gz: "
            "<urlopen error [Errno -3] Temporary failure in name resolution>)") in result.stderr
    assert existing.is_dir() and list(existing.iterdir()) == []
    assert "Downloading" not in result.output  # torchvision's own prints are kept for the reason, not shown
