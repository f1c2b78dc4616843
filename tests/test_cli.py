import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_raw
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from fmnist_hpo.cli.app import app
from fmnist_hpo.search import sweep as sweep_module
from fmnist_hpo.training.checkpoints import load_trained, read_checkpoint
from fmnist_hpo.training.model import with_normalization

runner = CliRunner()
CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def write_config(folder: Path, raw: dict) -> Path:
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_help_does_not_import_torch_or_mlflow():
    code = "import sys; from fmnist_hpo.cli.app import app; print(sorted({'torch', 'mlflow', 'hyperopt'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "run" in result.output and "validate" in result.output


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path):
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "# search space" in result.output
    text = path.read_text()
    keys = [line for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#") and not line.rstrip().endswith(":")]
    assert [line for line in keys if "#" not in line] == [], "every key carries a comment"


def test_bad_config_is_one_line_per_problem_and_exit_2(tmp_path: Path):
    path = write_config(tmp_path, {"train": {"epochs": 0}, "model": {"filtres": 8}})
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [f"error: {path}: 2 problems:",
                                          "  model.filtres: unknown key (did you mean 'model.filters'?)",
                                          "  train.epochs: must be >= 1, got 0"]
    assert not (tmp_path / "mlflow.db").exists()
    result = runner.invoke(app, ["run", str(write_config(tmp_path, {"train": {"epochs": 0}}))])
    assert result.stderr == f"error: {path}: train.epochs: must be >= 1, got 0\n"


def test_dry_run_prints_the_resolved_config(tmp_path: Path, data_dir: Path):
    raw = tiny_raw(data_dir, search={"max_evals": 2, "space": {"model.filters": {"choice": [4, 8]}}})
    result = runner.invoke(app, ["run", str(write_config(tmp_path, raw)), "--dry-run", "--set", "train.epochs=2"])
    assert result.exit_code == 0
    assert yaml.safe_load(result.output)["train"]["epochs"] == 2
    assert "model.filters: choice(4, 8)" in result.output


def test_missing_data_is_exit_2_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    raw = tiny_raw(tmp_path / "nowhere")
    result = runner.invoke(app, ["run", str(write_config(tmp_path, raw))])
    assert result.exit_code == 2
    assert "train-images-idx3-ubyte" in result.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "models").exists()


def test_unavailable_device_is_exit_2(tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = runner.invoke(app, ["run", str(write_config(tmp_path, tiny_raw(data_dir))), "--device", "cuda"])
    assert result.exit_code == 2 and "'cuda' is not available" in result.stderr


def children_of(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("fmnist.role") == "sweep"]
    children = sorted((r for r in runs if r.data.tags.get("fmnist.role") == "trial"), key=lambda r: r.info.run_name)
    return parents, children


def test_run_end_to_end_into_sqlite(tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    raw = tiny_raw(data_dir, search={"max_evals": 2, "space": {"model.filters": {"choice": [4, 8]}}},
                   mlflow={"log_model": "best", "time_to_accuracy": [0.05, 0.999]})
    result = runner.invoke(app, ["run", str(write_config(tmp_path, raw)), "--experiment", "e2e"])
    assert result.exit_code == 0, result.output + result.stderr
    assert "best trial" in result.output

    client = MlflowClient(f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    parents, children = children_of(client, "e2e")
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.params["model.filters"] in ("4", "8")  # real values, not choice indices
        assert child.data.params["train.epochs"] == "1"
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds"):
            assert len(client.get_metric_history(child.info.run_id, key)) == 1
        for key in ("kept_val_accuracy", "kept_epoch", "test_accuracy", "test_loss", "total_parameters",
                    "trial_seconds", "epochs_run"):
            assert key in child.data.metrics
        epochs = client.get_metric_history(child.info.run_id, "epoch_seconds")
        assert child.data.metrics["trial_seconds"] == pytest.approx(sum(m.value for m in epochs))
        assert child.data.metrics["kept_epoch"] == 1 == int(child.data.tags["kept_epoch"])  # epochs count from 1
        # time to accuracy: 5% is reached in the first (only) epoch, 99.9% never, so it is not logged
        assert child.data.metrics["epochs_to_val_acc_5"] == 1
        assert child.data.metrics["seconds_to_val_acc_5"] == client.get_metric_history(child.info.run_id,
                                                                                        "epoch_seconds")[0].value
        assert "seconds_to_val_acc_99_9" not in child.data.metrics
        assert {"config.yaml", "checkpoint"} <= {a.path for a in client.list_artifacts(child.info.run_id)}
        inputs = client.get_run(child.info.run_id).inputs.dataset_inputs  # dataset lineage: the three splits
        contexts = {tag.value for i in inputs for tag in i.tags if tag.key == "mlflow.data.context"}
        assert contexts == {"train", "validation", "test"}
        assert Path("models/e2e", f"{child.info.run_id}.pt").is_file()

    best = client.get_run(parent.data.tags["selected_run_id"])
    assert parent.data.metrics["selected_test_accuracy"] == best.data.metrics["test_accuracy"]
    assert best.data.metrics["kept_val_accuracy"] == max(c.data.metrics["kept_val_accuracy"] for c in children)
    checkpoint = Path("models/e2e", f"{best.info.run_id}.pt")
    assert read_checkpoint(checkpoint)["model_config"]["filters"] == int(best.data.params["model.filters"])
    model = with_normalization(*load_trained(checkpoint))
    images = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    expected = model(torch.from_numpy(images)).detach()
    logged = mlflow.pytorch.load_model(best.data.tags["model_uri"])
    assert torch.allclose(logged(torch.from_numpy(images)), expected, atol=1e-5)
    assert expected.argmax(1).shape == (3,)


def test_failed_trials_are_recorded_and_the_sweep_goes_on(tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    real = sweep_module.train_and_test

    def flaky(cfg, *args, **kwargs):
        if cfg.model.filters == 4:
            raise RuntimeError("CUDA out of memory (injected)")
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(sweep_module, "train_and_test", flaky)
    raw = tiny_raw(data_dir, search={"max_evals": 4, "algo": "random", "seed": 3,
                                     "space": {"model.filters": {"choice": [4, 8]}}})
    result = runner.invoke(app, ["run", str(write_config(tmp_path, raw))])
    assert result.exit_code == 0, result.stderr
    _, children = children_of(MlflowClient(f"sqlite:///{Path.cwd() / 'mlflow.db'}"), "tiny")
    failed = [c for c in children if c.info.status == "FAILED"]
    assert failed and len(failed) < 4
    assert all(c.data.tags["failure_reason"] == "RuntimeError: CUDA out of memory (injected)" for c in failed)
    assert "failed: RuntimeError" in result.output

    raw["experiment"] = "allfail"
    raw["search"]["space"] = {"model.filters": {"choice": [4]}}
    result = runner.invoke(app, ["run", str(write_config(tmp_path, raw))])
    assert result.exit_code == 1
    assert "the only trial failed" in result.stderr  # a one-point space is trained once, whatever max_evals
    parents, _ = children_of(MlflowClient(f"sqlite:///{Path.cwd() / 'mlflow.db'}"), "allfail")
    assert parents[0].info.status == "FAILED"


def test_grid_with_repeats_trains_each_configuration_with_new_seeds(tmp_path: Path, data_dir: Path,
                                                                    monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    raw = tiny_raw(data_dir, search={"algo": "grid", "repeats": 2,
                                     "space": {"model.dropout_placement": {"choice": ["early", "none"]}}})
    result = runner.invoke(app, ["run", str(write_config(tmp_path, raw))])
    assert result.exit_code == 0, result.stderr
    _, children = children_of(MlflowClient(f"sqlite:///{Path.cwd() / 'mlflow.db'}"), "tiny")
    seen = sorted((c.data.params["model.dropout_placement"], c.data.params["train.seed"], c.data.tags["repeat"])
                  for c in children)
    assert seen == [("early", "42", "0"), ("early", "43", "1"), ("none", "42", "0"), ("none", "43", "1")]


def test_engine_and_benchmarks_import_without_mlflow_hyperopt_loguru_or_ray():
    """The GPU machines have torch, numpy and pyyaml but none of these: the engine must not need them."""
    root = Path(__file__).parents[1]
    code = (
        "import sys, runpy\n"
        "for name in ('mlflow', 'hyperopt', 'loguru', 'ray'): sys.modules[name] = None\n"
        "import fmnist_hpo.training.loop, fmnist_hpo.data.loading, fmnist_hpo.data.splits, fmnist_hpo.training.model\n"
        "import fmnist_hpo.training.checkpoints\n"
        "import fmnist_hpo.config.sections, fmnist_hpo.config.space, fmnist_hpo.search.pruning, fmnist_hpo.modelops.inference\n"
        "fmnist_hpo.config.sections.validate({'search': {'space': {'train.lr': {'loguniform': [1e-4, 1e-2]}}}})\n"
        f"for script in ('train_throughput', 'time_to_accuracy', 'sweep_throughput', 'gpu_check'):\n"
        f"    runpy.run_path('{root}/benchmarks/' + script + '.py', run_name='imported')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_flags_show_no_type_in_help():
    for command in ("run", "evaluate"):
        result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "160"})
        flag_lines = [line for line in result.output.splitlines()
                      if any(f"{flag} " in line for flag in ("--dry-run", "--resume", "--fresh", "--quiet", "--best", "--log"))]
        assert flag_lines and not [line for line in flag_lines if "<bool>" in line or "--no-" in line]


def test_a_finished_single_spec_is_not_retrained_silently(tmp_path: Path, data_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    spec = str(write_config(tmp_path, tiny_raw(data_dir, mlflow={"log_model": "none"})))
    assert runner.invoke(app, ["run", spec, "-q", "--experiment", "again"]).exit_code == 0
    second = runner.invoke(app, ["run", spec, "--experiment", "again"])
    assert second.exit_code == 0, second.output + second.stderr
    assert "again: finished before (sweep " in second.output and "--fresh to rerun" in second.output
    assert "best trial 0" in second.output  # its results, as the first run printed them
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(children_of(client, "again")[0]) == 1
    assert runner.invoke(app, ["run", spec, "-q", "--experiment", "again", "--fresh"]).exit_code == 0
    assert len(children_of(client, "again")[0]) == 2


def test_help_uses_conventional_metavars():
    for command in ("", "run", "validate", "analyze", "serve-ui", "evaluate", "predict", "register", "schema"):
        result = runner.invoke(app, [*command.split(), "--help"], env={"COLUMNS": "160"})
        assert result.exit_code == 0
        assert not [line for line in result.output.splitlines() if "<" in line or "{" in line], result.output
    usage = {c: runner.invoke(app, [c, "--help"], prog_name="fmnist").output.split("Usage: ")[1].splitlines()[0].strip()
             for c in ("run", "predict", "evaluate")}
    assert usage == {"run": "fmnist run [OPTIONS] SPEC...", "predict": "fmnist predict [OPTIONS] MODEL [IMAGE]...",
                     "evaluate": "fmnist evaluate [OPTIONS] [TARGET]"}
    assert "KEY=VALUE" in runner.invoke(app, ["run", "--help"], env={"COLUMNS": "160"}).output


def test_version():
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"fmnist-hpo {version('fmnist-hpo')}\n"


def test_evaluate_with_an_experiment_implies_best(monkeypatch: pytest.MonkeyPatch):
    from fmnist_hpo.errors import FmnistError
    from fmnist_hpo.modelops import operations

    asked = []

    def resolve_model(target, tracking_uri, experiment=None):
        asked.append((target, experiment))
        raise FmnistError("stop here")

    monkeypatch.setattr(operations, "resolve_model", resolve_model)
    result = runner.invoke(app, ["evaluate", "--experiment", "exp12"])
    assert result.exit_code == 2 and result.stderr == "error: stop here\n" and asked == [(None, "exp12")]
    result = runner.invoke(app, ["evaluate", "some-run", "--experiment", "exp12"])
    assert result.exit_code == 2 and "not both" in result.stderr


def test_run_opens_with_where_it_works_and_closes_with_where_results_are(tmp_path: Path, data_dir: Path,
                                                                         monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    checkpoint = tmp_path / "models" / "tiny" / "abc.pt"

    def finished_sweep(cfg, **kwargs):
        best = sweep_module.TrialRecord(number=3, run_id="abc", values={}, checkpoint=checkpoint,
                                        kept_val_accuracy=0.9, kept_val_loss=0.3, test_accuracy=0.89)
        return sweep_module.SweepResult("tiny", "parent", "val_accuracy", [best])

    monkeypatch.setattr(sweep_module, "run_from_config", finished_sweep)
    result = runner.invoke(app, ["run", str(write_config(tmp_path, tiny_raw(data_dir)))])
    assert result.exit_code == 0, result.stderr
    lines = result.output.splitlines()
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    from fmnist_hpo.training.device import cpu_has_native_bf16

    precision = "bf16" if cpu_has_native_bf16() else "fp32"  # what precision: auto is on this CPU
    assert lines[0] == (f"tiny: device: cpu ({precision}); data: {data_dir}; store: {store}; "
                        f"checkpoints: {tmp_path / 'models' / 'tiny'}")
    assert lines[-1] == f"runs of tiny are in {store}; best checkpoint: {checkpoint}"


def enum_choices() -> dict[str, tuple[str, ...]]:
    """Dotted key -> the values its Literal type allows, straight from the section models."""
    import typing

    from fmnist_hpo.config.sections import Config, Section

    choices = {}
    for section_name, section in Config.model_fields.items():
        if not issubclass(section.annotation, Section):
            continue
        for name, info in section.annotation.model_fields.items():
            if typing.get_origin(info.annotation) is typing.Literal:
                choices[f"{section_name}.{name}"] = typing.get_args(info.annotation)
    return choices


def key_comments(text: str) -> dict[str, str]:
    """'section.key' -> the comment on its line, for the two-level layout of the shipped configs."""
    comments, section = {}, ""
    for line in text.splitlines():
        body, _, comment = line.partition("#")
        key = body.strip().split(":", 1)[0]
        if not body.strip():
            continue
        if not line.startswith(" "):
            section = key if body.rstrip().endswith(":") else ""
        elif section:
            comments[f"{section}.{key}"] = comment
    return comments


def test_enum_choices_are_read_from_config_types():
    choices = enum_choices()
    assert choices["train.scheduler"] == ("step", "onecycle", "cosine", "none")
    assert choices["mlflow.log_model"] == ("best", "all", "none")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_enum_comment_lists_its_choices(path: Path):
    comments = key_comments(path.read_text())
    missing = {key: [c for c in allowed if not re.search(rf"\b{c}\b", comments[key])]
               for key, allowed in enum_choices().items() if key in comments}
    assert {key: absent for key, absent in missing.items() if absent} == {}
