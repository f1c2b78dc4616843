"""The experiment spec: typed sections, loading, overrides and validation.

A spec is read as plain YAML, overrides are merged into that raw mapping, and only then is the
whole thing validated, so a `--set` value or a sampled search point passes the same checks as
the file itself. Every problem is collected before anything is reported.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fmnist_hpo.config import bounded_yaml
from fmnist_hpo.config.space import FIXED_KEYS, FIXED_SECTIONS, parse_entry, probe_values
from fmnist_hpo.errors import ConfigError


def setting(default: Any, doc: str, **bounds: float) -> Any:
    """A config field with its help text and numeric bounds (ge, gt, le, lt)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"doc": doc, **bounds})
    return field(default=default, metadata={"doc": doc, **bounds})


MAX_SEED = 2**32 - 1  # what numpy's and torch's generators take from every platform
MAX_DESCRIPTION = 10_000  # characters; it is logged as the sweep's note and param


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["fashion-mnist", "mnist", "kmnist"] = setting(
        "fashion-mnist", "the 28x28 grey 10-class dataset torchvision reads: fashion-mnist, mnist or kmnist")
    root: str | None = setting(None, "folder holding the four IDX files; null: $FMNIST_DATA_DIR, else data/")
    download: bool = setting(True, "download the files with torchvision when they are missing")
    val_size: int = setting(10_000, "training images held out (stratified) for early stopping and the search", ge=10)
    split_seed: int = setting(0, "seed of the validation split; fixed so every trial sees the same split",
                              ge=0, le=MAX_SEED)
    train_subset: int | None = setting(None, "train on the class-balanced first N remaining images; null: all", ge=10)
    augment_flip: bool = setting(False, "random horizontal flips, applied on the device")
    augment_translate: int = setting(0, "random translation by up to this many pixels", ge=0, le=8)
    augment_erase: float = setting(0.0, "probability of random erasing per image", ge=0, le=1)


@dataclass(frozen=True)
class ModelConfig:
    architecture: Literal["cnn", "dual_path"] = setting("cnn", "cnn: one conv tower; dual_path: 3x3 and 5x5 towers")
    num_blocks: int = setting(3, "conv blocks: conv 3x3, BatchNorm, ReLU, MaxPool 2, Dropout2d", ge=1, le=6)
    filters: int = setting(256, "channels of every conv layer", ge=1, le=4096)
    units1: int = setting(192, "units of the first dense layer", ge=1, le=16384)
    units2: int = setting(96, "units of the second dense layer", ge=1, le=16384)
    batchnorm: bool = setting(True, "BatchNorm after every conv and dense layer")
    residual: bool = setting(False, "add a shortcut around every block after the first")
    conv_dropout: float | list[float] = setting(0.05, "Dropout2d rate after each block (one, or one per block)", ge=0, lt=1)
    dropout_placement: Literal["all", "none", "early", "middle", "late", "both"] = setting(
        "all", "which conv blocks get Dropout2d: all, none, early (first), middle, late (last), both (first and last)"
    )
    dense1_dropout: float = setting(0.15, "dropout after the first dense layer", ge=0, lt=1)
    dense2_dropout: float = setting(0.1, "dropout after the second dense layer", ge=0, lt=1)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = setting(40, "maximum number of epochs", ge=1, le=10_000)
    batch_size: int = setting(64, "images per training step", ge=2, le=65_536)
    lr: float = setting(1e-3, "Adam learning rate", gt=0, le=10)
    weight_decay: float = setting(0.0, "Adam weight decay (L2)", ge=0, le=1)
    scheduler: Literal["step", "onecycle", "cosine", "none"] = setting("step", "learning-rate schedule")
    step_size: int = setting(10, "StepLR: epochs between decays", ge=1)
    gamma: float = setting(0.5, "StepLR: factor applied every step_size epochs", gt=0, le=1)
    label_smoothing: float = setting(0.0, "cross-entropy label smoothing", ge=0, lt=1)
    patience: int | None = setting(15, "stop after this many epochs without improvement; null: never stop early", ge=1)
    min_delta: float = setting(0.0, "smallest change of the monitored metric that counts as improvement", ge=0)
    monitor: Literal["val_loss", "val_accuracy"] = setting(
        "val_loss", "metric early stopping watches; the kept epoch is always the best by search.metric")
    seed: int = setting(42, "seed of weights, batch order and dropout; same seed, same CPU result", ge=0, le=MAX_SEED)
    device: Literal["auto", "cuda", "mps", "cpu"] = setting("auto", "auto picks cuda, then mps, then cpu")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = setting(
        "auto", "auto: bf16 autocast on CUDA (fp16 with loss scaling where bf16 is unsupported) and on CPUs "
        "with native bf16 (AVX512-BF16, AMX), fp32 elsewhere")
    channels_last: bool = setting(True, "NHWC memory format: faster convolutions on CUDA and CPU (ignored on MPS)")
    compile: bool = setting(False, "torch.compile the model (pays off on CUDA for long runs)")
    cuda_graphs: bool | Literal["auto"] = setting(
        "auto", "replay each training and evaluation step from a CUDA graph: auto (on CUDA without compile or fp16), "
        "true (or an error), false")
    eval_batch_size: int = setting(256, "images per evaluation step (256 is fastest on CPU)", ge=1)


SearchAlgo = Literal["tpe", "random", "anneal", "grid"]


@dataclass(frozen=True)
class SearchConfig:
    algo: SearchAlgo = setting("tpe", "tpe, random or anneal (Hyperopt), or grid: every combination of choices")
    max_evals: int = setting(1, "number of sampled configurations (grid: ignored)", ge=1, le=100_000)
    repeats: int = setting(1, "runs of each configuration, with seeds train.seed, train.seed+1, ...", ge=1, le=1000)
    metric: Literal["val_loss", "val_accuracy"] = setting(
        "val_accuracy", "picks each trial's kept epoch and is the search objective: val_loss minimised, val_accuracy maximised")
    seed: int = setting(0, "seed of the search algorithm; same seed, same sampled points", ge=0, le=MAX_SEED)
    parallel: int | Literal["auto"] = setting(
        "auto", "trials at once; auto: as many as fit in free GPU memory (1 on CPU/MPS or without Ray); "
        "above 1 the sweep runs on Ray Tune (the [ray] extra)", ge=1, le=1024)
    gpus_per_trial: float | None = setting(None, "GPU share of each parallel trial; null: spread the GPUs over the trials", gt=0)
    ray_address: str | None = setting(None, "an existing Ray cluster to run on; null: $RAY_ADDRESS, else a local instance")
    pruner: Literal["none", "median", "asha"] = setting(
        "none", "stop bad trials early: median (worse than the median of earlier trials), asha (Ray engine only)")
    grace_epochs: int = setting(3, "epochs every trial gets before it may be pruned", ge=1)
    space: dict[str, dict[str, Any]] = setting({}, "dotted config key -> {primitive: arguments}; empty: one run")


@dataclass(frozen=True)
class MlflowConfig:
    tracking_uri: str | None = setting(None, "null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    log_model: Literal["best", "all", "none"] = setting("best", "trials whose model is logged as an MLflow model")
    system_metrics: bool = setting(False, "record CPU/GPU utilisation and memory with MLflow's system metrics")
    time_to_accuracy: list[float] = setting(
        [0.85, 0.90, 0.92], "validation accuracies whose first reaching each trial logs, as training seconds and "
        "epochs (seconds_to_val_acc_90, epochs_to_val_acc_90)", gt=0, le=1)


@dataclass(frozen=True)
class Config:
    experiment: str = setting("default", "MLflow experiment name; also the folder under models/")
    description: str = setting("", "free text, logged with the sweep")
    models_dir: str = setting("models", "where best-epoch checkpoints are written")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}; the search space stays one value."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path != "search.space":
            flat.update(flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def config_hash(cfg: Config) -> str:
    return hash_of(to_dict(cfg))


def hash_of(raw: dict[str, Any]) -> str:
    text = json.dumps(raw, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# --- loading and overrides -------------------------------------------------------------------


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(["is a directory; give the experiment spec file (YAML) inside it"], str(path))
    if not path.is_file():
        suggestion = spec_like(path)
        raise ConfigError([f"no such file{f' (did you mean {suggestion}?)' if suggestion else ''}"], str(path))
    if path.stat().st_size > bounded_yaml.MAX_SPEC_BYTES:
        raise ConfigError([f"{path.stat().st_size} bytes: too large to be a spec (at most {bounded_yaml.MAX_SPEC_BYTES})"],
                          str(path))
    try:
        raw = bounded_yaml.load(path.read_text())
    except bounded_yaml.SpecTooLarge as exc:
        raise ConfigError([f"too large to be a spec: {exc}"], str(path)) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError([f"not valid YAML: {where}{exc.problem}"], str(path)) from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError([f"not valid YAML: {exc}"], str(path)) from None
    if raw is None:
        raise ConfigError(["the file is empty"], str(path))
    if not isinstance(raw, dict):
        raise ConfigError([f"must be a mapping of sections, got {type(raw).__name__}"], str(path))
    return raw


SPEC_SUFFIXES = (".yaml", ".yml")
SPEC_FOLDER = Path("configs")


def spec_like(path: Path) -> str | None:
    """The existing spec a missing path most likely meant: the other YAML suffix, a bare name in
    configs/, else a spec whose name starts with it or is close to it, beside it (or in configs/)."""
    stem = path.stem if path.suffix in SPEC_SUFFIXES else path.name
    folders = [path.parent] + ([SPEC_FOLDER] if path.parent == Path(".") else [])
    for folder in folders:
        for suffix in SPEC_SUFFIXES:
            if (folder / f"{stem}{suffix}").is_file():
                return str(folder / f"{stem}{suffix}")
    specs = {p.stem: p for folder in folders if folder.is_dir() for suffix in SPEC_SUFFIXES
             for p in sorted(folder.glob(f"*{suffix}"))}
    starting = sorted(name for name in specs if name.startswith(stem))
    if len(starting) > 1:  # exp1 -> exp10 … exp13: no one of them is the likelier
        shown = [str(specs[name]) for name in starting[:4]]
        return "one of " + ", ".join(shown) + (", …" if len(starting) > 4 else "")
    close = starting or difflib.get_close_matches(stem, specs, n=1, cutoff=0.6)
    return str(specs[close[0]]) if close else None


def parse_override(text: str) -> tuple[str, Any]:
    """'train.epochs=3' -> ('train.epochs', 3); the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"override {text!r} must look like key=value"], "--set")
    try:
        return key.strip(), bounded_yaml.load(value)
    except bounded_yaml.SpecTooLarge as exc:
        raise ConfigError([f"override of {key.strip()!r}: value too large ({exc})"], "--set") from None
    except yaml.YAMLError:
        raise ConfigError([f"override {text!r}: value is not valid YAML"], "--set") from None


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set raw['a']['b'] for key 'a.b'; a search-space key keeps its dots after 'search.space.'."""
    parts = key.split(".")
    if parts[:2] == ["search", "space"] and len(parts) > 2:
        parts = ["search", "space", ".".join(parts[2:])]
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(raw)
    for key, value in overrides.items():
        set_dotted(merged, key, value)
    return merged


def load(path: str | Path, overrides: list[str] | None = None, flags: dict[str, str] | None = None) -> Config:
    """The validated spec at path with overrides ('key=value') applied; a problem under an overridden
    key is blamed on the option that set it: flags maps such keys to their option (default `--set`)."""
    raw = read_yaml(path)
    parsed = dict(parse_override(o) for o in overrides or [])
    try:
        return validate(apply_overrides(raw, parsed), source=str(path))
    except ConfigError as exc:
        sources = [_source_of(problem, parsed, flags or {}, str(path)) for problem in exc.problems]
        raise ConfigError(exc.problems, str(path), sources) from None


def _source_of(problem: str, overridden: dict[str, Any], flags: dict[str, str], file_source: str) -> str:
    key = problem.split(": ", 1)[0]
    for overridden_key in overridden:
        if key == overridden_key or key.startswith(f"{overridden_key}."):
            return flags.get(overridden_key, "--set")
    return file_source


def validate(raw: dict[str, Any], source: str = "config") -> Config:
    problems: list[str] = []
    cfg = _build(Config, raw, "", problems)
    if cfg is not None:
        problems += _cross_checks(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


# --- the validator ---------------------------------------------------------------------------


def _build(cls: type, raw: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(raw, dict):
        problems.append(f"{path.rstrip('.') or 'config'}: must be a mapping, got {_describe(raw)}")
        return None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            hint = difflib.get_close_matches(str(key), fields, n=1)
            suggestion = f" (did you mean '{path}{hint[0]}'?)" if hint else ""
            problems.append(f"{path}{key}: unknown key{suggestion}")
    values: dict[str, Any] = {}
    ok = True
    for name, f in fields.items():
        if name not in raw:
            continue
        where = f"{path}{name}"
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            value = _build(tp, raw[name], f"{where}.", problems)
            ok &= value is not None
        else:
            try:
                value = _coerce(raw[name], tp)
                _check_bounds(value, f.metadata)
            except ValueError as exc:
                problems.append(f"{where}: {exc}")
                ok = False
                continue
        values[name] = value
    return cls(**values) if ok else None


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)  # a problem is one line: a long value is cut, never printed whole
    return f"{type(value).__name__} {text if len(text) <= 80 else text[:72] + ' ...'}"


def _coerce(value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option)
            except ValueError as exc:
                errors.append(str(exc))
        # "must be an integer, got str 'x'" + "must be one of auto; got str 'x'" -> one clause, one "got"
        wants = [re.split(r"[,;] got ", error)[0] for error in errors]
        raise ValueError(f"{' or '.join(dict.fromkeys(wants))}; got {_describe(value)}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"must be one of {', '.join(map(str, args))}; got {_describe(value)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"must be a list, got {_describe(value)}")
        return [_coerce(v, args[0]) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"must be a mapping, got {_describe(value)}")
        return dict(value)
    return _coerce_scalar(value, tp)


def _coerce_scalar(value: Any, tp: type) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"must be true or false, got {_describe(value)}")
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)  # quniform samples integral floats
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"must be an integer, got {_describe(value)}")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, int | float) and not isinstance(value, bool):
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError(f"must be a finite number, got {value}")
            return float(value)
        raise ValueError(f"must be a number, got {_describe(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"must be a string, got {_describe(value)}")
    return value


def _check_bounds(value: Any, meta: typing.Mapping[str, Any]) -> None:
    if isinstance(value, list):
        for item in value:
            _check_bounds(item, meta)
        return
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    for key, test, word in (("ge", float.__ge__, ">="), ("gt", float.__gt__, ">"),
                            ("le", float.__le__, "<="), ("lt", float.__lt__, "<")):
        if key in meta and not test(float(value), float(meta[key])):
            raise ValueError(f"must be {word} {meta[key]:g}, got {value}")


def _cross_checks(cfg: Config) -> list[str]:
    problems = []
    if isinstance(cfg.model.conv_dropout, list) and len(cfg.model.conv_dropout) != cfg.model.num_blocks:
        problems.append(
            f"model.conv_dropout: has {len(cfg.model.conv_dropout)} rates for "
            f"{cfg.model.num_blocks} blocks (give one rate, or one per block)"
        )
    problems += _engine_checks(cfg.search)
    problems += _graph_checks(cfg.train)
    if cfg.model.dropout_placement == "middle" and cfg.model.num_blocks < 3:
        problems.append("model.dropout_placement: middle needs num_blocks >= 3 (the blocks between first and last)")
    if len(cfg.description) > MAX_DESCRIPTION:
        problems.append(f"description: at most {MAX_DESCRIPTION} characters, got {len(cfg.description)}")
    if cfg.train.seed + cfg.search.repeats - 1 > MAX_SEED:
        problems.append(f"train.seed: with {cfg.search.repeats} repeats the last seed would pass {MAX_SEED}")
    if not EXPERIMENT_NAME.fullmatch(cfg.experiment):
        problems.append(
            f"experiment: {cfg.experiment!r} must be 1-100 letters, digits, '.', '_' or '-' "
            "(it names a folder under models/)"
        )
    problems += check_space(cfg)
    return problems


def check_space(cfg: Config) -> list[str]:
    """Every problem with cfg.search.space: shape, arguments, and values the target key rejects."""
    problems = []
    if cfg.search.algo == "grid":
        problems += [f"search.space.{key}: grid search takes only choice entries"
                     for key, spec in cfg.search.space.items() if not (isinstance(spec, dict) and "choice" in spec)]
    base = to_dict(cfg)
    base["search"]["space"] = {}
    base_problems = _problems_of(base) if cfg.search.space else set()  # reported once, for the spec itself
    known = field_docs()
    for key, spec in cfg.search.space.items():
        where = f"search.space.{key}"
        if key not in known:
            problems.append(f"{where}: names no config key{_suggest(key, known)}")
            continue
        if key in FIXED_KEYS or key.startswith(FIXED_SECTIONS):
            problems.append(f"{where}: a search cannot vary {key}")
            continue
        try:
            kind, args = parse_entry(key, spec)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        for value in probe_values(kind, args):
            raw = apply_overrides(base, {key: value})
            try:
                validate(raw)
            except ConfigError as exc:
                new = [problem for problem in exc.problems if problem not in base_problems]
                if not new:
                    continue
                detail = new[0].split(": ", 1)[-1]
                problems.append(f"{where}: value {value!r} is invalid for {key}: {detail}")
                break
    return problems


def _problems_of(raw: dict[str, Any]) -> set[str]:
    try:
        validate(raw)
    except ConfigError as exc:
        return set(exc.problems)
    return set()


def _suggest(key: str, known: dict[str, str]) -> str:
    hint = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean '{hint[0]}'?)" if hint else ""


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


def _graph_checks(train: TrainConfig) -> list[str]:
    """train.cuda_graphs: true with settings it cannot work with (auto turns itself off instead)."""
    if train.cuda_graphs is not True:
        return []
    problems = []
    if train.device in ("cpu", "mps"):
        problems.append(f"train.cuda_graphs: true needs a CUDA device, got train.device: {train.device}")
    if train.compile:
        problems.append("train.cuda_graphs: true and train.compile: true are exclusive (choose one)")
    if train.precision == "fp16":
        problems.append("train.cuda_graphs: true cannot capture fp16's GradScaler; use bf16 or fp32")
    return problems


EXPERIMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def field_docs(cls: type = Config, prefix: str = "") -> dict[str, str]:
    """Dotted key -> help text, for `fmnist validate --keys` and the README reference."""
    docs: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            docs.update(field_docs(hints[f.name], f"{prefix}{f.name}."))
        else:
            docs[f"{prefix}{f.name}"] = f.metadata.get("doc", "")
    return docs
