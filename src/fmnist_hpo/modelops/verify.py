"""`fmnist verify`: re-read a store and check, trial by trial, that what it says still holds.

Per sweep: its status against its process (a sweep left RUNNING by a process that is gone), its
counts, and that its selected run is what the selection rule picks from its runs, with the same
figures. Per trial: its status; a complete per-epoch history; a kept epoch that is the best epoch
by the sweep's metric, with final figures that are that epoch's; its checkpoint (the local file
and the run's artifact copy), which loads with weights_only=True, belongs to the run and re-scores
on the test set to the logged test accuracy; its logged model, which lives in the run's experiment,
links to the run both ways, loads through mlflow.pytorch.load_model and predicts like the
checkpoint; the dataset digests of its lineage against the IDX files on disk.

Nothing is written: the store is read through tracking.reader.StoreView, copies go to temporary folders.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from fmnist_hpo.data.datasets import UNNAMED, DatasetInfo, dataset_named
from fmnist_hpo.errors import DataError, first_line
from fmnist_hpo.files import checkpoint_file, models_folder
from fmnist_hpo.records import EPOCH_METRICS, TRIAL_SECONDS, EpochMetrics, LoggedTrial
from fmnist_hpo.selection import kept_epoch, select
from fmnist_hpo.tags import (
    DEVICE,
    FAILURE_REASON,
    HOST,
    INTERRUPTED,
    KEPT_EPOCH,
    MODEL_URI,
    PARENT,
    PID,
    PRECISION,
    SELECTED_RUN_ID,
    ModelStatus,
    RunStatus,
    flagged,
)
from fmnist_hpo.tracking.provenance import alive_elsewhere, split_fingerprint
from fmnist_hpo.tracking.reader import StoreView
from fmnist_hpo.training.checkpoints import CheckpointError, load_model, read_checkpoint

# test accuracy re-scored on the CPU in fp32 against one measured elsewhere (CUDA kernels, bf16
# autocast, torch.compile): at most this far apart. A CPU fp32 trial must re-score exactly; a CPU bf16
# one is re-scored in bf16.
RESCORE_TOLERANCE = 0.005
LOGIT_TOLERANCE = 1e-4  # the logged model (a torch.export program) against the checkpoint, fp32 on the CPU
RESTORE_ADVICE = "the product restores it from there where it uses it (resume, log_model, evaluate)"
KEPT_FIGURES = (("kept_val_accuracy", "val_accuracy"), ("kept_val_loss", "val_loss"),
                ("kept_train_accuracy", "train_accuracy"))


@dataclass
class Finding:
    """One thing found wrong (a problem) or worth knowing (a note), about one run."""

    experiment: str
    run: str  # "trial 3 (run 1a2b…)" or "sweep (run 9f8e…)"
    run_id: str
    check: str
    message: str

    def line(self) -> str:
        return f"{self.experiment} {self.run}: {self.message}"


@dataclass
class Report:
    problems: list[Finding] = field(default_factory=list)
    notes: list[Finding] = field(default_factory=list)
    experiments: int = 0
    sweeps: int = 0
    trials: int = 0
    rescored: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        verdict = "everything holds" if self.ok else f"{len(self.problems)} problem(s)"
        if self.ok and self.notes:  # nothing wrong is not everything right: say what was not looked at
            verdict = f"everything checked holds; {len(self.notes)} check(s) could not run (the notes above)"
        return (f"verified {self.experiments} experiment(s), {self.sweeps} sweep(s), {self.trials} trial(s), "
                f"{self.rescored} re-scored: {verdict}")

    def lines(self) -> list[str]:
        return [*(f"note: {n.line()}" for n in self.notes), *(p.line() for p in self.problems), self.summary()]

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": [asdict(p) for p in self.problems], "notes": [asdict(n) for n in self.notes],
                "summary": {"experiments": self.experiments, "sweeps": self.sweeps, "trials": self.trials,
                            "rescored": self.rescored, "problems": len(self.problems), "text": self.summary()}}


@dataclass(frozen=True)
class Request:
    tracking_uri: str
    experiments: list[str]
    all_experiments: bool = False
    rescore: int | None = None  # re-score this many trials, best on validation first; None: all
    data_root: str | None = None  # the IDX files; None: each trial's data.root, else $FMNIST_DATA_DIR, else data/


def verify(request: Request) -> Report:
    view = StoreView(request.tracking_uri)
    names = view.experiments() if request.all_experiments else list(dict.fromkeys(request.experiments))
    for name in names:
        view.experiment_id(name)  # an unknown name is an error before anything is checked
    verifier = Verifier(view, request)
    for name in names:
        verifier.check_experiment(name)
    return verifier.report


def _trial_precision(trial: LoggedTrial) -> str:
    """fp32, bf16 or fp16: the trial's `precision` tag; runs from before it have train.precision, where auto
    meant fp32 on a CPU."""
    if PRECISION in trial.tags:
        return trial.tags[PRECISION]
    configured = _param(trial.params, "train.precision", "auto")
    return "fp32" if configured == "auto" and trial.tags.get(DEVICE) == "cpu" else str(configured)


def _trial_dataset(trial: LoggedTrial) -> DatasetInfo:
    """The dataset a trial trained on; a run from before the key was logged trained on Fashion-MNIST."""
    return dataset_named(str(_param(trial.params, "data.dataset", UNNAMED.name)))


def _param(params: dict[str, str], key: str, default: Any = None) -> Any:
    """A logged param back as its value (params are logged as JSON, strings as they are)."""
    if key not in params:
        return default
    try:
        return yaml.safe_load(params[key])
    except yaml.YAMLError:
        return params[key]


def _label(trial: LoggedTrial) -> str:
    return f"trial {trial.number} (run {trial.run_id[:8]})"


class Verifier:
    def __init__(self, view: StoreView, request: Request) -> None:
        self.view = view
        self.request = request
        self.report = Report()
        self._models_by_run: dict[str, list[Any]] | None = None
        self._test_sets: dict[tuple[Path, str], tuple[torch.Tensor, torch.Tensor] | None] = {}  # by (root, dataset)
        self._digests: dict[tuple[Path, str], str | None] = {}
        self._experiment = ""

    # --- findings -------------------------------------------------------------------------

    def problem(self, run: str, run_id: str, check: str, message: str) -> None:
        self.report.problems.append(Finding(self._experiment, run, run_id, check, message))

    def note(self, run: str, run_id: str, check: str, message: str) -> None:
        self.report.notes.append(Finding(self._experiment, run, run_id, check, message))

    # --- an experiment and its sweeps ------------------------------------------------------

    def check_experiment(self, name: str) -> None:
        self._experiment = name
        self.report.experiments += 1
        sweeps = {s.run_id: s for s in self.view.sweeps(name)}
        trials = self.view.trials(name)
        rescore = self._to_rescore(trials)
        states = {}
        for sweep in sweeps.values():
            self.report.sweeps += 1
            members = [t for t in trials if t.tags.get(PARENT) == sweep.run_id]
            states[sweep.run_id] = self.check_sweep(sweep, members)
        for trial in trials:
            self.report.trials += 1
            parent = trial.tags.get(PARENT)
            if parent not in sweeps:
                self.problem(_label(trial), trial.run_id, "status", f"belongs to no sweep of {name} (parent {parent})")
            self.check_trial(trial, states.get(parent, "gone"), trial.run_id in rescore)

    def _to_rescore(self, trials: list[LoggedTrial]) -> set[str]:
        eligible = [t for t in trials if t.eligible()]
        ranked = sorted(eligible, key=lambda t: (t.objective(t.search_metric), t.number))
        count = len(ranked) if self.request.rescore is None else max(self.request.rescore, 0)
        return {t.run_id for t in ranked[:count]}

    def check_sweep(self, sweep: LoggedTrial, trials: list[LoggedTrial]) -> str:
        """Its status against its process, counts and selection; returns live, unknown, dead or its status."""
        label = f"sweep (run {sweep.run_id[:8]})"
        resume = "continue it with `fmnist run SPEC --resume`"
        if sweep.status == RunStatus.RUNNING:
            if sweep.tags.get(HOST) not in (None, os.uname().nodename):
                self.note(label, sweep.run_id, "status", f"RUNNING, driven from host {sweep.tags[HOST]}: whether "
                          "it is still alive cannot be told here; its running trials are not blamed")
                return "unknown"
            if alive_elsewhere(sweep.tags):
                self.note(label, sweep.run_id, "status", f"still running (pid {sweep.tags[PID]}): "
                          "its running trials are not blamed")
                return "live"
            self.problem(label, sweep.run_id, "status", f"left RUNNING, but its process (pid {sweep.tags.get(PID, '?')}) "
                         f"is gone (a crash or kill -9): {resume}")
            return "dead"
        if sweep.status == RunStatus.KILLED:
            self.note(label, sweep.run_id, "status", f"interrupted: {resume}")
        if sweep.status == RunStatus.FINISHED:
            self.check_counts(label, sweep, trials)
            self.check_selection(label, sweep, trials)
        return sweep.status

    def check_counts(self, label: str, sweep: LoggedTrial, trials: list[LoggedTrial]) -> None:
        counted = [t for t in trials if not flagged(t.tags, INTERRUPTED)]
        actual = {"trials_finished": sum(t.status == RunStatus.FINISHED for t in counted),
                  "trials_failed": sum(t.status == RunStatus.FAILED for t in counted)}
        for key, count in actual.items():
            if key in sweep.metrics and int(sweep.metrics[key]) != count:
                self.problem(label, sweep.run_id, "selection", f"{key} is {int(sweep.metrics[key])}, its runs hold {count}")

    def check_selection(self, label: str, sweep: LoggedTrial, trials: list[LoggedTrial]) -> None:
        runs = [t for t in trials if not flagged(t.tags, INTERRUPTED)]
        metric = _param(sweep.params, "search.metric", "val_accuracy")
        chosen = select(runs, metric)
        selected = sweep.tags.get(SELECTED_RUN_ID)
        if chosen is None:
            if selected:
                self.problem(label, sweep.run_id, "selection", f"names selected run {selected[:8]}, but none of its "
                             "trials is eligible")
            return
        pick = chosen.representative
        if selected != pick.run_id:
            named = next((t for t in runs if t.run_id == selected), None)
            said = _label(named) if named else f"run {selected[:8]}" if selected else "nothing"
            self.problem(label, sweep.run_id, "selection", f"selects {said}, but the selection rule ({metric} on "
                         f"validation) picks {_label(pick)}")
            return
        for key in ("kept_val_accuracy", "kept_val_loss", "test_accuracy", "test_loss"):
            name = "selected_" + key.removeprefix("kept_")
            expected = chosen.mean(lambda t, key=key: t.metrics.get(key, math.nan))
            if math.isfinite(expected) and not math.isclose(sweep.metrics.get(name, math.nan), expected,
                                                            rel_tol=1e-9, abs_tol=1e-12):
                self.problem(label, sweep.run_id, "selection", f"{name} is {sweep.metrics.get(name, 'missing')}, "
                             f"the selected runs' mean is {expected}")

    # --- a trial ---------------------------------------------------------------------------

    def check_trial(self, trial: LoggedTrial, sweep_state: str, rescore: bool) -> None:
        label = _label(trial)
        if trial.status == RunStatus.RUNNING and sweep_state not in ("live", "unknown"):
            self.problem(label, trial.run_id, "status", "left RUNNING by a sweep that is not running: "
                         "`fmnist run SPEC --resume` continues it")
        elif trial.status == RunStatus.KILLED and sweep_state in (RunStatus.FINISHED, RunStatus.FAILED):
            self.problem(label, trial.run_id, "status", f"KILLED, though its sweep is {sweep_state}")
        elif trial.status == RunStatus.FAILED and FAILURE_REASON not in trial.tags:
            self.problem(label, trial.run_id, "status", "FAILED with no failure_reason")
        self._check_models_of_run(label, trial)
        if trial.status != RunStatus.FINISHED:
            return
        history = self.check_history(label, trial)
        if history is not None:
            self.check_figures(label, trial, history)
        model = self.check_checkpoint(label, trial) if "test_accuracy" in trial.metrics else None
        if model is not None and rescore:
            self.check_rescore(label, trial, model)
        if MODEL_URI in trial.tags:
            self.check_logged_model(label, trial, model)
        self.check_lineage(label, trial)

    def check_history(self, label: str, trial: LoggedTrial) -> list[EpochMetrics] | None:
        """The per-epoch history, if every epoch metric has a value for every epoch the run says it ran."""
        if "epochs_run" not in trial.metrics:
            self.problem(label, trial.run_id, "history", "finished without epochs_run")
            return None
        epochs = int(trial.metrics["epochs_run"])
        by_key = {key: self.view.history(trial.run_id, key) for key in EPOCH_METRICS}
        complete = True
        for key, values in by_key.items():
            missing = sorted(set(range(epochs)) - set(values))
            extra = sorted(set(values) - set(range(epochs)))
            if missing or extra:
                complete = False
                where = ", ".join(filter(None, [
                    f"no value for epoch(s) {', '.join(str(s + 1) for s in missing)}" if missing else "",
                    f"values beyond epochs_run at epoch(s) {', '.join(str(s + 1) for s in extra)}" if extra else ""]))
                self.problem(label, trial.run_id, "history", f"{key} history of {epochs} epoch(s) is incomplete: {where}")
        if not complete:
            return None
        return [EpochMetrics(step, **{k: by_key[k][step] for k in EPOCH_METRICS}) for step in range(epochs)]

    def check_figures(self, label: str, trial: LoggedTrial, history: list[EpochMetrics]) -> None:
        metric = trial.search_metric
        logged = trial.kept_epoch
        best = kept_epoch(history, metric) + 1
        if logged != best:
            self.problem(label, trial.run_id, "kept epoch", f"kept_epoch is {logged}, but the best epoch by {metric} "
                         f"is {best}")
        tag = trial.tags.get(KEPT_EPOCH)
        if tag is not None and tag != str(logged):
            self.problem(label, trial.run_id, "kept epoch", f"the kept_epoch tag says {tag}, the metric {logged}")
        if 1 <= logged <= len(history):
            epoch = history[logged - 1]
            for name, key in KEPT_FIGURES:
                if name in trial.metrics and not math.isclose(trial.metrics[name], getattr(epoch, key), rel_tol=1e-9,
                                                              abs_tol=1e-12):
                    self.problem(label, trial.run_id, "figures", f"{name} is {trial.metrics[name]:.6g}, epoch {logged}'s "
                                 f"{key} is {getattr(epoch, key):.6g}")
        total = sum(m.epoch_seconds for m in history)
        if TRIAL_SECONDS in trial.metrics and not math.isclose(trial.trial_seconds, total, rel_tol=1e-6, abs_tol=1e-6):
            self.problem(label, trial.run_id, "figures", f"trial_seconds is {trial.trial_seconds:.6g}, its epochs sum "
                         f"to {total:.6g}")

    # --- its checkpoint --------------------------------------------------------------------

    def check_checkpoint(self, label: str, trial: LoggedTrial) -> torch.nn.Module | None:
        """The checkpoint the product would use (the local file, else the artifact copy), loaded; None if none loads."""
        local = checkpoint_file(models_folder(str(_param(trial.params, "models_dir", "models")), self._experiment), trial.run_id)
        with self.view.checkpoint_artifact(trial.run_id) as copy:
            found = [(path, name) for path, name in ((local, str(local)), (copy, "the run's checkpoint artifact"))
                     if path is not None and path.is_file()]
            if not found:
                self.problem(label, trial.run_id, "checkpoint", f"no checkpoint: neither {local} nor a checkpoint artifact")
                return None
            loaded, broken = [], []
            for path, name in found:
                try:
                    loaded.append((path, name, read_checkpoint(path)))
                except CheckpointError as exc:
                    broken.append((path, name, str(exc).removeprefix(f"{path}: ")))
            copy_intact = any(path != local for path, _, _ in loaded)
            for path, name, why in broken:
                advice = f"; the run's artifact copy is intact: {RESTORE_ADVICE}" if path == local and copy_intact else ""
                self.problem(label, trial.run_id, "checkpoint", f"{name}: {why}{advice}")
            if len(loaded) == 2 and _sha256(loaded[0][0]) != _sha256(loaded[1][0]):
                self.problem(label, trial.run_id, "checkpoint", f"{local} differs from the run's checkpoint artifact")
            if not loaded:
                return None
            path, name, payload = loaded[0]
            self._check_payload(label, trial, name, payload)
            try:
                return load_model(path)
            except CheckpointError as exc:
                self.problem(label, trial.run_id, "checkpoint", f"{name}: {str(exc).removeprefix(f'{path}: ')}")
                return None

    def _check_payload(self, label: str, trial: LoggedTrial, name: str, payload: dict[str, Any]) -> None:
        if payload.get("run_id", trial.run_id) != trial.run_id:
            self.problem(label, trial.run_id, "checkpoint", f"{name} belongs to run {str(payload['run_id'])[:8]}")
        saved_epoch = payload.get("kept_epoch", payload["best_epoch"] + 1 if "best_epoch" in payload else None)
        if saved_epoch is not None and int(saved_epoch) != trial.kept_epoch:
            self.problem(label, trial.run_id, "checkpoint", f"{name} holds epoch {saved_epoch}, the run kept epoch "
                         f"{trial.kept_epoch}")
        trained_on, run_on = payload.get("dataset", UNNAMED.name), _param(trial.params, "data.dataset", UNNAMED.name)
        if trained_on != run_on:
            self.problem(label, trial.run_id, "checkpoint", f"{name} was trained on {trained_on}, the run on {run_on}")
        differ = sorted(k for k, v in payload["model_config"].items()
                        if f"model.{k}" in trial.params and _param(trial.params, f"model.{k}") != v)
        if differ:
            self.problem(label, trial.run_id, "checkpoint", f"{name}'s model config differs from the run's params "
                         f"in {', '.join(differ)}")

    def check_rescore(self, label: str, trial: LoggedTrial, model: torch.nn.Module) -> None:
        from fmnist_hpo.data.splits import Split
        from fmnist_hpo.training.loop import Engine, evaluate

        test = self._test_set(label, trial)
        if test is None:
            return
        channels_last = bool(_param(trial.params, "train.channels_last", False))
        model = model.to(memory_format=torch.channels_last) if channels_last else model
        precision = _trial_precision(trial)
        dtype = torch.bfloat16 if precision == "bf16" else None  # re-scored in what it was scored in, where the CPU can
        engine = Engine(torch.device("cpu"), dtype, torch.Generator(), _trial_dataset(trial), channels_last=channels_last)
        _, accuracy = evaluate(model, Split(*test), engine, int(_param(trial.params, "train.eval_batch_size", 256)))
        self.report.rescored += 1
        logged, count = trial.metrics["test_accuracy"], len(test[1])
        exact = (trial.tags.get(DEVICE) == "cpu" and precision == "fp32"
                 and not _param(trial.params, "train.compile", False))
        if exact and round(accuracy * count) != round(logged * count):
            self.problem(label, trial.run_id, "rescore", f"its checkpoint re-scores {accuracy:.4f} on the {count} test "
                         f"images, the run logged {logged:.4f} (a CPU fp32 trial must agree exactly)")
        elif not exact and abs(accuracy - logged) > RESCORE_TOLERANCE:
            self.problem(label, trial.run_id, "rescore", f"its checkpoint re-scores {accuracy:.4f} on the {count} test "
                         f"images, the run logged {logged:.4f} (more than {RESCORE_TOLERANCE} apart for a trial on "
                         f"{trial.tags.get(DEVICE, '?')})")

    # --- its logged model ------------------------------------------------------------------

    def _check_models_of_run(self, label: str, trial: LoggedTrial) -> None:
        """LoggedModels whose source is this run: in its experiment, and none left unfinished."""
        if self._models_by_run is None:
            self._models_by_run = {}
            for m in self.view.logged_models():
                self._models_by_run.setdefault(m.source_run_id or "", []).append(m)
        own = self.view.experiment_id(self._experiment)
        for m in self._models_by_run.get(trial.run_id, []):
            if m.experiment_id != own:
                self.problem(label, trial.run_id, "logged model", f"its model {m.model_id} is filed in experiment "
                             f"{self.view.experiment_name(m.experiment_id)!r}, not in {self._experiment!r}")
            if m.status != ModelStatus.READY:
                self.problem(label, trial.run_id, "logged model", f"its model {m.model_id} is {m.status}: a logging cut off "
                             "by an interrupt; logging this run's model again (a resumed sweep does) deletes it")

    def check_logged_model(self, label: str, trial: LoggedTrial, checkpoint_model: torch.nn.Module | None) -> None:
        uri = trial.tags[MODEL_URI]
        info = self.view.logged_model(uri.removeprefix("models:/"))
        if info is None:
            self.problem(label, trial.run_id, "logged model", f"model_uri {uri} names no LoggedModel in this store")
            return
        if info.source_run_id != trial.run_id:
            self.problem(label, trial.run_id, "logged model", f"{uri} comes from run {info.source_run_id}, not this one")
        if info.model_id not in self.view.model_outputs(trial.run_id):
            self.problem(label, trial.run_id, "logged model", f"the run does not list {uri} among its outputs")
        try:
            logged = self.view.load_logged_model(uri)
        except Exception as exc:  # whatever MLflow or torch.export raise for a model that does not load
            self.problem(label, trial.run_id, "logged model",
                         f"{uri} does not load through mlflow.pytorch.load_model ({first_line(exc)})")
            return
        if checkpoint_model is None:
            return
        from fmnist_hpo.training.model import with_normalization

        info = _trial_dataset(trial)
        shape = (16, info.channels, *info.image_shape)
        images = torch.from_numpy(np.random.default_rng(0).random(shape, dtype=np.float32))
        with torch.inference_mode():
            expected = with_normalization(checkpoint_model.to(memory_format=torch.contiguous_format), info)(images)
            got = logged(images)
        gap = float((got - expected).abs().max())
        if not gap <= LOGIT_TOLERANCE:
            self.problem(label, trial.run_id, "logged model", f"{uri} predicts unlike the checkpoint (logits up to "
                         f"{gap:.3g} apart)")

    # --- its data --------------------------------------------------------------------------

    def _data_root(self, trial: LoggedTrial) -> Path:
        from fmnist_hpo.config.sections import validate
        from fmnist_hpo.data.loading import data_root

        root = self.request.data_root or _param(trial.params, "data.root")
        return data_root(validate({"data": {"root": root, "download": False}}).data).absolute()

    def _test_set(self, label: str, trial: LoggedTrial) -> tuple[torch.Tensor, torch.Tensor] | None:
        root, info = self._data_root(trial), _trial_dataset(trial)
        key = (root, info.name)
        if key not in self._test_sets:
            from fmnist_hpo.config.sections import validate
            from fmnist_hpo.data.loading import load_dataset

            try:
                data = {"root": str(root), "download": False, "dataset": info.name}
                dataset = load_dataset(validate({"data": data}).data)
                self._test_sets[key] = (torch.from_numpy(dataset.test_images).unsqueeze(1),
                                        torch.from_numpy(dataset.test_labels))
            except DataError as exc:
                self._test_sets[key] = None
                self.note(label, trial.run_id, "rescore", f"test accuracy cannot be re-scored: {exc}")
        return self._test_sets[key]

    def check_lineage(self, label: str, trial: LoggedTrial) -> None:
        from fmnist_hpo.data.lineage import idx_digest

        inputs = self.view.datasets(trial.run_id)
        if not inputs:
            self.note(label, trial.run_id, "lineage", "no dataset lineage recorded (a run from before it was)")
            return
        root, info = self._data_root(trial), _trial_dataset(trial)
        key = (root, info.name)
        if key not in self._digests:
            try:
                self._digests[key] = idx_digest(root, info)
            except (DataError, OSError) as exc:
                self._digests[key] = None
                self.note(label, trial.run_id, "lineage", f"dataset digests cannot be checked: {exc}")
        digest = self._digests[key]
        for item in inputs:
            files = item.profile.get("files_digest")
            own = split_fingerprint(str(files), item.context, item.profile.get("split_seed"),
                                    item.profile.get("num_examples"))
            if item.digest != own:
                self.problem(label, trial.run_id, "lineage", f"its {item.context} dataset's digest {item.digest} "
                             "does not match its own profile")
            elif digest is not None and files != digest:
                self.problem(label, trial.run_id, "lineage", f"its {item.context} split came from IDX files with "
                             f"digest {files}, the files under {root} have {digest}")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
