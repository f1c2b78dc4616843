from pathlib import Path

import pytest

from fmnist_hpo.config.loading import apply_overrides, config_hash, flatten, hash_of, load, to_dict
from fmnist_hpo.config.sections import field_docs, validate
from fmnist_hpo.errors import ConfigError


def problems_of(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(raw)
    return info.value.problems


def test_defaults_are_the_study_recipe():
    cfg = validate({})
    assert (cfg.model.filters, cfg.model.units1, cfg.model.units2, cfg.model.num_blocks) == (256, 192, 96, 3)
    assert (cfg.model.conv_dropout, cfg.model.dense1_dropout, cfg.model.dense2_dropout) == (0.05, 0.15, 0.1)
    assert (cfg.train.lr, cfg.train.step_size, cfg.train.gamma) == (1e-3, 10, 0.5)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.patience) == (40, 64, 15)


def test_unknown_key_suggests_the_closest_one():
    assert problems_of({"train": {"epoch": 3}}) == ["train.epoch: unknown key (did you mean 'train.epochs'?)"]
    assert problems_of({"trian": {}})[0].startswith("trian: unknown key (did you mean 'train'?)")


def test_every_problem_is_reported_at_once():
    problems = problems_of({"train": {"epochs": 0, "lr": "fast", "batch_size": 1.5}, "model": {"batchnorm": "yes"}})
    assert problems == [
        "model.batchnorm: must be true or false, got str 'yes'",
        "train.epochs: must be >= 1, got 0",
        "train.batch_size: must be an integer, got float 1.5",
        "train.lr: must be a number, got str 'fast'",
    ]


def test_error_message_names_the_file(tmp_path: Path):
    path = tmp_path / "x.yaml"
    path.write_text("train:\n  epochs: 0\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == f"{path}: train.epochs: must be >= 1, got 0"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "the file is empty"),
        ("train: [1, 2\n", "not valid YAML: line 2, column 1"),
        ("- 1\n- 2\n", "must be a mapping of sections, got list"),
        ("train: 3\n", "train: must be a mapping, got int 3"),
    ],
)
def test_unreadable_files(tmp_path: Path, text: str, expected: str):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert expected in str(info.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="no such file"):
        load("does/not/exist.yaml")


def test_a_missing_spec_suggests_the_one_it_probably_meant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    for name in ("quick.yaml", "exp01_baseline_batchnorm.yaml", "exp12.yaml", "exp13_dropout_placement.yaml"):
        (tmp_path / "configs" / name).write_text("experiment: x\n")
    for given, meant in (("quick", "configs/quick.yaml"), ("configs/quick.yml", "configs/quick.yaml"),
                         ("exp01", "configs/exp01_baseline_batchnorm.yaml"), ("configs/quik.yaml", "configs/quick.yaml")):
        with pytest.raises(ConfigError) as info:
            load(given)
        assert str(info.value) == f"{given}: no such file (did you mean {meant}?)"
    with pytest.raises(ConfigError) as info:
        load("configs/exp1.yaml")  # exp12 and exp13 both start so: neither is the likelier
    assert str(info.value) == ("configs/exp1.yaml: no such file (did you mean one of configs/exp12.yaml, "
                               "configs/exp13_dropout_placement.yaml?)")
    with pytest.raises(ConfigError) as info:
        load("configs/zzzz.yaml")
    assert str(info.value) == "configs/zzzz.yaml: no such file"


def test_overrides_are_typed_and_validated(tmp_path: Path):
    path = tmp_path / "x.yaml"
    path.write_text("train:\n  epochs: 5\n")
    cfg = load(path, ["train.epochs=3", "train.lr=1e-3", "data.train_subset=null", "model.conv_dropout=[0.1, 0.2, 0.3]"])
    assert cfg.train.epochs == 3
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.model.conv_dropout == [0.1, 0.2, 0.3]
    with pytest.raises(ConfigError, match=r"train\.epochs: must be >= 1, got -2"):
        load(path, ["train.epochs=-2"])
    with pytest.raises(ConfigError, match="must look like key=value"):
        load(path, ["train.epochs"])


def test_a_section_an_override_made_is_blamed_on_the_override(tmp_path: Path):
    made = tmp_path / "made.yaml"
    made.write_text("train:\n  epochs: 5\n")
    written = tmp_path / "written.yaml"
    written.write_text("trian:\n  epochs: 5\n")
    for path, overrides, source in ((made, ["trian.epochs=2"], "--set"), (written, ["trian.epochs=2"], str(written)),
                                    (written, [], str(written))):
        with pytest.raises(ConfigError) as info:
            load(path, overrides)
        assert info.value.problems == ["trian: unknown key (did you mean 'train'?)"]
        assert info.value.sources == [source], (path.name, overrides)


def test_a_value_of_a_right_type_out_of_bounds_is_told_the_bound():
    assert problems_of({"search": {"parallel": 0}}) == ["search.parallel: must be >= 1, got 0"]
    assert problems_of({"search": {"parallel": "many"}}) == [
        "search.parallel: must be an integer or must be one of auto; got str 'many'"]
    assert problems_of({"model": {"conv_dropout": [0.1, 1.0, 0.1]}}) == ["model.conv_dropout: must be < 1, got 1.0"]


def test_the_dataset_is_one_of_three():
    assert validate({}).data.dataset == "fashion-mnist"
    assert validate({"data": {"dataset": "kmnist"}}).data.dataset == "kmnist"
    assert problems_of({"data": {"dataset": "cifar10"}}) == [
        "data.dataset: must be one of fashion-mnist, mnist, kmnist; got str 'cifar10'"]


ODD_VALUES = [None, True, -1, 1.5, 1e308, float("nan"), "", "text", [], [[1]], {}, {1: 2}, {"choice": []}, "x" * 500,
              2**70]


def test_any_odd_value_at_any_key_is_one_short_line():
    for key in [*field_docs(), "data", "search.space.train.lr", "train.nope"]:
        for value in ODD_VALUES:
            try:
                validate(apply_overrides({}, {key: value}))
            except ConfigError as exc:
                assert all("\n" not in p and len(p) < 200 and p.split(": ", 1)[0] for p in exc.problems), (key, value)


def test_yaml_exponent_without_dot_is_a_number():
    assert validate({"train": {"lr": "1e-3"}}).train.lr == pytest.approx(1e-3)


def test_cross_field_checks():
    assert problems_of({"model": {"conv_dropout": [0.1, 0.2]}}) == [
        "model.conv_dropout: has 2 rates for 3 blocks (give one rate, or one per block)"
    ]
    assert "experiment:" in problems_of({"experiment": "../etc"})[0]
    assert "middle" in problems_of({"model": {"num_blocks": 2, "dropout_placement": "middle"}})[0]


def test_flatten_and_hash_are_stable():
    cfg = validate({"search": {"space": {"train.lr": {"loguniform": [1e-4, 1e-2]}}}})
    flat = flatten(to_dict(cfg))
    assert flat["train.epochs"] == 40
    assert flat["search.space"] == {"train.lr": {"loguniform": [1e-4, 1e-2]}}
    assert config_hash(cfg) == config_hash(validate(to_dict(cfg)))
    assert config_hash(cfg) != config_hash(validate({}))


def test_every_key_has_help_text():
    docs = field_docs()
    assert "train.epochs" in docs
    assert all(docs.values())


def test_readme_reference_lists_every_key():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    missing = [key for key in field_docs() if f"| `{key}` |" not in readme]
    assert missing == []


def test_a_key_added_later_leaves_the_hash_of_a_spec_at_its_default_as_it_was():
    """A sweep interrupted before data.dataset existed is found again by its hash, and resumes."""
    raw = to_dict(validate({}))
    before_the_key = {**raw, "data": {k: v for k, v in raw["data"].items() if k != "dataset"}}
    assert hash_of(raw) == hash_of(before_the_key)
    assert hash_of({**raw, "data": {**raw["data"], "dataset": "mnist"}}) != hash_of(raw)
