"""The experiment spec's sections as pydantic models, and the rules between their keys.

Every key has its type, bounds, default and help text here; the JSON Schema (schema.py) is read
from these models. A raw mapping (a spec file with its overrides, a sampled search point) becomes
a Config through `validate`, which reports every problem at once, one line each.
"""

import difflib
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator

from fmnist_hpo.config.problems import RulesBroken, problems_of, shown
from fmnist_hpo.config.space import FIXED_KEYS, FIXED_SECTIONS, parse_entry, probe_values
from fmnist_hpo.errors import ConfigError

MAX_SEED = 2**32 - 1  # what numpy's and torch's generators take from every platform
MAX_DESCRIPTION = 10_000  # characters; it is logged as the sweep's note and param
EXPERIMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def _whole_float_as_int(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value  # quniform samples 128.0


def _numeric_text_as_float(value: Any) -> Any:
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


# The bounds sit on the inner type, before the validator: so the JSON Schema carries them as minimum and
# maximum inside a union or a list too (after a validator pydantic writes them as its own ge, gt, ...).
def integer(**bounds: float) -> Any:
    """An int within bounds (ge, gt, le, lt): no text, no bool, and a float only when it is whole."""
    return Annotated[int, Strict(), Field(**bounds), BeforeValidator(_whole_float_as_int)]


def number(**bounds: float) -> Any:
    """A finite float within bounds (ge, gt, le, lt): an int too, or text that reads as a number, never a bool."""
    return Annotated[float, Strict(), Field(**bounds), BeforeValidator(_numeric_text_as_float)]


Switch = Annotated[bool, Strict()]
Text = Annotated[str, Strict()]
Metric = Literal["val_loss", "val_accuracy"]


class Section(BaseModel):
    """A part of the spec: closed to unknown keys, immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def passing(section: Section, problems: list[str]) -> Any:
    """The section, if no rule between its keys is broken."""
    if problems:
        raise RulesBroken(problems)
    return section


class DataConfig(Section):
    dataset: Literal["fashion-mnist", "mnist", "kmnist"] = Field(
        "fashion-mnist", description="the image set: fashion-mnist (Zalando's clothes), mnist (handwritten digits) or "
        "kmnist (Kuzushiji characters); each is 28x28 grey images of ten classes")
    root: Text | None = Field(None, description="folder holding the four IDX files; null: $FMNIST_DATA_DIR, else data/")
    download: Switch = Field(True, description="download the files with torchvision when they are missing")
    val_size: integer(ge=10) = Field(
        10_000, description="training images held out (stratified) for early stopping and the search")
    split_seed: integer(ge=0, le=MAX_SEED) = Field(
        0, description="seed of the validation split; fixed so every trial sees the same split")
    train_subset: integer(ge=10) | None = Field(
        None, description="train on the class-balanced first N remaining images; null: all")
    augment_flip: Switch = Field(False, description="random horizontal flips, applied on the device")
    augment_translate: integer(ge=0, le=8) = Field(0, description="random translation by up to this many pixels")
    augment_erase: number(ge=0, le=1) = Field(0.0, description="probability of random erasing per image")


class ModelConfig(Section):
    architecture: Literal["cnn", "dual_path"] = Field(
        "cnn", description="cnn: one conv tower; dual_path: 3x3 and 5x5 towers")
    num_blocks: integer(ge=1, le=6) = Field(
        3, description="conv blocks: conv 3x3, BatchNorm, ReLU, MaxPool 2, Dropout2d")
    filters: integer(ge=1, le=4096) = Field(256, description="channels of every conv layer")
    units1: integer(ge=1, le=16384) = Field(192, description="units of the first dense layer")
    units2: integer(ge=1, le=16384) = Field(96, description="units of the second dense layer")
    batchnorm: Switch = Field(True, description="BatchNorm after every conv and dense layer")
    residual: Switch = Field(False, description="add a shortcut around every block after the first")
    conv_dropout: number(ge=0, lt=1) | list[number(ge=0, lt=1)] = Field(
        0.05, description="Dropout2d rate after each block (one, or one per block)")
    dropout_placement: Literal["all", "none", "early", "middle", "late", "both"] = Field(
        "all", description="which conv blocks get Dropout2d: all, none, early (first), middle, late (last), "
        "both (first and last)")
    dense1_dropout: number(ge=0, lt=1) = Field(0.15, description="dropout after the first dense layer")
    dense2_dropout: number(ge=0, lt=1) = Field(0.1, description="dropout after the second dense layer")

    @model_validator(mode="after")
    def _dropout_fits_the_blocks(self) -> "ModelConfig":
        problems = []
        if isinstance(self.conv_dropout, list) and len(self.conv_dropout) != self.num_blocks:
            problems.append(f"model.conv_dropout: has {len(self.conv_dropout)} rates for {self.num_blocks} blocks "
                            "(give one rate, or one per block)")
        if self.dropout_placement == "middle" and self.num_blocks < 3:
            problems.append("model.dropout_placement: middle needs num_blocks >= 3 (the blocks between first and last)")
        return passing(self, problems)


class TrainConfig(Section):
    epochs: integer(ge=1, le=10_000) = Field(40, description="maximum number of epochs")
    batch_size: integer(ge=2, le=65_536) = Field(64, description="images per training step")
    lr: number(gt=0, le=10) = Field(1e-3, description="Adam learning rate")
    weight_decay: number(ge=0, le=1) = Field(0.0, description="Adam weight decay (L2)")
    scheduler: Literal["step", "onecycle", "cosine", "none"] = Field("step", description="learning-rate schedule")
    step_size: integer(ge=1) = Field(10, description="StepLR: epochs between decays")
    gamma: number(gt=0, le=1) = Field(0.5, description="StepLR: factor applied every step_size epochs")
    label_smoothing: number(ge=0, lt=1) = Field(0.0, description="cross-entropy label smoothing")
    patience: integer(ge=1) | None = Field(
        15, description="stop after this many epochs without improvement; null: never stop early")
    min_delta: number(ge=0) = Field(
        0.0, description="smallest change of the monitored metric that counts as improvement")
    monitor: Metric = Field(
        "val_loss", description="metric early stopping watches; the kept epoch is always the best by search.metric")
    seed: integer(ge=0, le=MAX_SEED) = Field(
        42, description="seed of weights, batch order and dropout; same seed, same CPU result")
    device: Literal["auto", "cuda", "mps", "cpu"] = Field("auto", description="auto picks cuda, then mps, then cpu")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA (fp16 with loss scaling where bf16 is unsupported) and on "
        "CPUs with native bf16 (AVX512-BF16, AMX), fp32 elsewhere")
    channels_last: Switch = Field(
        True, description="NHWC memory format: faster convolutions on CUDA and CPU (ignored on MPS)")
    compile: Switch = Field(False, description="torch.compile the model (pays off on CUDA for long runs)")
    cuda_graphs: Switch | Literal["auto"] = Field(
        "auto", description="replay each training and evaluation step from a CUDA graph: auto (on CUDA without "
        "compile or fp16), true (or an error), false")
    eval_batch_size: integer(ge=1) = Field(256, description="images per evaluation step (256 is fastest on CPU)")

    @model_validator(mode="after")
    def _graphs_can_capture(self) -> "TrainConfig":
        if self.cuda_graphs is not True:  # auto turns itself off where graphs cannot capture
            return self
        return passing(self, cuda_graph_conflicts(self.device, self.compile, self.precision))


def cuda_graph_conflicts(device: str, compiled: bool, precision: str) -> list[str]:
    """Why train.cuda_graphs: true cannot capture a run on this device (cuda, cpu, mps), compiled or not,
    in this precision (fp32, bf16, fp16); a device or precision still `auto` may yet suit graphs."""
    conflicts = []
    if device not in ("cuda", "auto"):
        conflicts.append(f"needs a CUDA device, and this run is on {device}")
    if compiled:
        conflicts.append("and train.compile are exclusive (torch.compile's mode='reduce-overhead' brings its own graphs)")
    if precision == "fp16":
        conflicts.append("cannot capture fp16's GradScaler (its step reads the device); use bf16 or fp32")
    return [f"train.cuda_graphs: true {conflict}" for conflict in conflicts]


class SearchConfig(Section):
    algo: Literal["tpe", "random", "anneal", "grid"] = Field(
        "tpe", description="tpe, random or anneal (Hyperopt), or grid: every combination of choices")
    max_evals: integer(ge=1, le=100_000) = Field(1, description="number of sampled configurations (grid: ignored)")
    repeats: integer(ge=1, le=1000) = Field(
        1, description="runs of each configuration, with seeds train.seed, train.seed+1, ...")
    metric: Metric = Field(
        "val_accuracy", description="picks each trial's kept epoch and is the search objective: val_loss minimised, "
        "val_accuracy maximised")
    seed: integer(ge=0, le=MAX_SEED) = Field(
        0, description="seed of the search algorithm; same seed, same sampled points")
    parallel: integer(ge=1, le=1024) | Literal["auto"] = Field(
        "auto", description="trials at once; auto: as many as fit in free GPU memory (1 on CPU/MPS or without Ray); "
        "above 1 the sweep runs on Ray Tune (the [ray] extra)")
    gpus_per_trial: number(gt=0) | None = Field(
        None, description="GPU share of each parallel trial; null: spread the GPUs over the trials")
    ray_address: Text | None = Field(
        None, description="an existing Ray cluster to run on; null: $RAY_ADDRESS, else a local instance")
    pruner: Literal["none", "median", "asha"] = Field(
        "none", description="stop bad trials early: median (worse than the median of earlier trials), asha (Ray engine "
        "only)")
    grace_epochs: integer(ge=1) = Field(3, description="epochs every trial gets before it may be pruned")
    space: dict[Text, Any] = Field({}, description="dotted config key -> {primitive: arguments}; empty: one run")

    @model_validator(mode="after")
    def _engine_can_run_it(self) -> "SearchConfig":
        problems = _engine_checks(self)
        if self.algo == "grid":
            problems += [f"search.space.{key}: grid search takes only choice entries"
                         for key, entry in self.space.items() if not (isinstance(entry, dict) and "choice" in entry)]
        return passing(self, problems)


def sequential_only(search: SearchConfig) -> str | None:
    """Why this search can only run one trial at a time, or None; search.parallel: auto then means 1."""
    reasons = _sequential_reasons(search)
    return reasons[0] if reasons else None


def _sequential_reasons(search: SearchConfig) -> list[str]:
    reasons = []
    if search.algo in ("grid", "anneal"):
        reasons.append(f"search.algo: {search.algo} runs on the sequential engine only")
    if search.repeats > 1:
        reasons.append("search.repeats: repeats run on the sequential engine only")
    return reasons


def _engine_checks(search: SearchConfig) -> list[str]:
    """What only the sequential engine, or only the Ray engine, can do; auto counts as 1 here."""
    problems = []
    parallel = 1 if search.parallel == "auto" else search.parallel
    if search.pruner == "asha" and parallel == 1:
        problems.append("search.pruner: asha is Ray Tune's scheduler and needs search.parallel > 1 (or use median)")
    if parallel > 1:
        problems += [f"{reason} (search.parallel: 1)" for reason in _sequential_reasons(search)]
    return problems


class MlflowConfig(Section):
    tracking_uri: Text | None = Field(None, description="null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    log_model: Literal["best", "all", "none"] = Field(
        "best", description="trials whose model is logged as an MLflow model")
    system_metrics: Switch = Field(
        False, description="record CPU/GPU utilisation and memory with MLflow's system metrics")
    time_to_accuracy: list[number(gt=0, le=1)] = Field(
        [0.85, 0.90, 0.92], description="validation accuracies whose first reaching each trial logs, as training seconds "
        "and epochs (seconds_to_val_acc_90, epochs_to_val_acc_90)")


class Config(Section):
    experiment: Text = Field("default", description="MLflow experiment name; also the folder under models/",
                             json_schema_extra={"pattern": f"^{EXPERIMENT_NAME.pattern}$"})
    description: Text = Field("", max_length=MAX_DESCRIPTION, description="free text, logged with the sweep")
    models_dir: Text = Field("models", description="where best-epoch checkpoints are written")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)

    @field_validator("experiment")
    @classmethod
    def _names_a_folder(cls, name: str) -> str:
        if not EXPERIMENT_NAME.fullmatch(name):
            raise ValueError(f"{shown(name)} must be 1-100 letters, digits, '.', '_' or '-' (it names a folder under models/)")
        return name

    @model_validator(mode="after")
    def _seeds_and_space_fit(self) -> "Config":
        problems = []
        if self.train.seed + self.search.repeats - 1 > MAX_SEED:
            problems.append(f"train.seed: with {self.search.repeats} repeats the last seed would pass {MAX_SEED}")
        return passing(self, problems + check_space(self))


def validate(raw: Any, source: str = "config") -> Config:
    """The Config a raw mapping describes, or ConfigError with every problem, each blamed on source."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(problems_of(exc, Config), source) from None


def check_space(cfg: Config) -> list[str]:
    """Every problem with cfg.search.space: names, arguments, and values the target key rejects."""
    if not cfg.search.space:
        return []
    problems = []
    base = cfg.model_dump()
    base["search"]["space"] = {}
    base_problems = set(_problems_of(base))  # reported once, for the spec itself
    known = field_docs()
    for key, entry in cfg.search.space.items():
        where = f"search.space.{key}"
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            problems.append(f"{where}: names no config key" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
            continue
        if key in FIXED_KEYS or key.startswith(FIXED_SECTIONS):
            problems.append(f"{where}: a search cannot vary {key}")
            continue
        try:
            kind, args = parse_entry(key, entry)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        section, name = key.split(".")  # every key a search may vary is a section's
        for value in probe_values(kind, args):
            new = [p for p in _problems_of({**base, section: {**base[section], name: value}}) if p not in base_problems]
            if new:
                problems.append(f"{where}: value {shown(value)} is invalid for {key}: {new[0].split(': ', 1)[-1]}")
                break
    return problems


def _problems_of(raw: dict[str, Any]) -> list[str]:
    try:
        Config.model_validate(raw)
    except ValidationError as exc:
        return problems_of(exc, Config)
    return []


def field_docs(model: type[BaseModel] = Config, prefix: str = "") -> dict[str, str]:
    """Dotted key -> help text: the keys a search space may name, and the README reference."""
    docs: dict[str, str] = {}
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, Section):
            docs.update(field_docs(info.annotation, f"{prefix}{name}."))
        else:
            docs[f"{prefix}{name}"] = info.description or ""
    return docs
