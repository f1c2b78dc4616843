import math

import numpy as np
import pytest
from hyperopt import Trials, fmin, rand

from fmnist_hpo.config import space
from fmnist_hpo.config.loading import apply_overrides
from fmnist_hpo.config.sections import validate
from fmnist_hpo.errors import ConfigError
from fmnist_hpo.search import hyperopt_space


def space_problems(entries: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate({"search": {"space": entries}})
    return info.value.problems


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ({"model.filtres": {"choice": [1]}}, "search.space.model.filtres: names no config key (did you mean 'model.filters'?)"),
        ({"model.filters": {"choice": []}}, "search.space.model.filters: choice needs a non-empty list of options"),
        ({"train.lr": {"uniform": [0.1, 0.01]}}, "search.space.train.lr: uniform needs low < high, got low=0.1 high=0.01"),
        ({"train.lr": {"loguniform": [0, 1]}}, "search.space.train.lr: loguniform needs low > 0, got 0"),
        ({"train.lr": {"gaussian": [0, 1]}}, "search.space.train.lr: unknown primitive 'gaussian'"),
        ({"train.lr": {"uniform": [0.1]}}, "search.space.train.lr: uniform takes [low, high], got [0.1]"),
        ({"train.lr": {"normal": [0.1, -1]}}, "search.space.train.lr: normal needs sigma > 0, got -1"),
        ({"train.lr": {"quniform": [0.1, 1, 0]}}, "search.space.train.lr: quniform needs q > 0, got 0"),
        ({"model.filters": {"choice": [64, "wide"]}}, "value 'wide' is invalid for model.filters: must be an integer"),
        ({"model.dense1_dropout": {"uniform": [0.0, 1.5]}}, "value 1.5 is invalid for model.dense1_dropout: must be < 1"),
        ({"search.max_evals": {"choice": [1, 2]}}, "a search cannot vary search.max_evals"),
        ({"train.lr": [1, 2]}, "must be one primitive and its arguments"),
    ],
)
def test_bad_spaces_name_the_key_and_the_problem(entries: dict, expected: str):
    problems = space_problems(entries)
    assert len(problems) == 1
    assert expected in problems[0]


def test_primitives_sample_real_values_within_bounds():
    spec = {
        "model.filters": {"choice": [128, 192, 256]},
        "train.lr": {"loguniform": [1e-4, 1e-2]},
        "model.dense1_dropout": {"uniform": [0.0, 0.5]},
        "train.batch_size": {"quniform": [32, 256, 32]},
        "train.step_size": {"qloguniform": [2, 20, 1]},
        "model.units1": {"randint": [64, 70]},
        "train.weight_decay": {"normal": [0.001, 1e-6]},
    }
    cfg = validate({"search": {"space": spec, "max_evals": 30}})
    expressions = hyperopt_space.to_hyperopt(cfg.search.space)
    seen: list[dict] = []

    def objective(point: dict) -> float:
        seen.append(space.plain_values(point))
        return 0.0

    fmin(objective, expressions, algo=rand.suggest, max_evals=30, trials=Trials(),
         rstate=np.random.default_rng(0), show_progressbar=False)
    for point in seen:
        assert point["model.filters"] in (128, 192, 256)
        assert 1e-4 <= point["train.lr"] <= 1e-2
        assert 0.0 <= point["model.dense1_dropout"] <= 0.5
        assert isinstance(point["train.batch_size"], int) and point["train.batch_size"] % 32 == 0
        assert 64 <= point["model.units1"] < 70
        validate(apply_overrides({}, point))  # every sample is a valid config
    lrs = [math.log10(p["train.lr"]) for p in seen]
    assert min(lrs) < -3 < max(lrs)  # log scale: both decades are visited


def test_describe_lists_each_key():
    lines = space.describe({"model.filters": {"choice": [128, 256]}, "train.lr": {"loguniform": [1e-4, 1e-2]}})
    assert lines == ["model.filters: choice(128, 256)", "train.lr: loguniform(0.0001, 0.01)"]


def test_override_can_reach_a_dotted_search_key():
    raw = apply_overrides({}, {"search.space.train.lr": {"loguniform": [1e-4, 1e-3]}})
    assert raw == {"search": {"space": {"train.lr": {"loguniform": [1e-4, 1e-3]}}}}
