"""Configuration at the edge: YAML, overrides, errors that name the field, one source for each default."""

import pytest
from pydantic import ValidationError

from cluster.config import ForestConfig, SearchConfig, ServeConfig, load_config
from search.params import MCTSParams


def test_yaml_config_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("workers: 3\nsearch:\n  granularity: mini_step:32\n  iterations: 9\n")
    config = load_config(path, **{"search.iterations": 4, "engine.model": "/m", "build.limit": None})
    assert config.workers == 3 and config.search.iterations == 4 and config.engine.model == "/m"
    params = config.search.to_params()
    assert str(params.granularity) == "mini_step:32" and params.budget.iterations == 4


@pytest.mark.parametrize("overrides, field", [
    ({"search.children": 0}, "children"),
    ({"search.granularity": "paragraph"}, "granularity"),
    ({"search.budget_tokens": -3}, "budget_tokens"),
    ({"search.reflection": "maybe"}, "reflection"),
    ({"workers": 0}, "workers"),
    ({"engine.device": "tpu"}, "device"),
    ({"search.itterations": 3}, "itterations"),  # a typo is an error, not silently ignored
])
def test_bad_config_values_name_the_field(overrides, field):
    with pytest.raises(ValidationError) as err:
        load_config(None, **overrides)
    assert field in str(err.value)


def test_search_config_defaults_are_the_search_cores():
    """Each default is written once (in ``MCTSParams``); the config starts from it."""
    assert SearchConfig().to_params() == MCTSParams()
    assert ServeConfig().max_path_tokens == MCTSParams().max_path_tokens


def test_a_strategy_preset_overrides_the_configured_granularity():
    search = SearchConfig(granularity="step", max_step_tokens=48)
    assert str(search.to_params(granularity="mini_step:32").granularity) == "mini_step:32"
    assert search.to_params(granularity="step").granularity.tokens == 48


def test_the_in_flight_bound_is_one_setting_of_the_pool():
    assert ForestConfig(max_in_flight_per_worker=7).max_in_flight_per_worker == 7
    with pytest.raises(ValidationError, match="max_in_flight_per_worker"):
        load_config(None, **{"build.max_in_flight_per_worker": 7})  # not a build setting: every app uses it


def test_a_reward_model_value_needs_a_value_model_and_presets_fix_the_value():
    from search.params import ValueKind
    from search.strategies import STRATEGIES

    with pytest.raises(ValidationError, match="search.value='reward_model'.*value_model.model"):
        ForestConfig.model_validate({"search": {"value": "reward_model"}})
    config = ForestConfig.model_validate({"search": {"value": "reward_model"}, "value_model": {"model": "v"}})
    assert config.value_model.model == "v" and config.search_identity()["value_model"] == "v"
    params = ForestConfig().search.to_params(**STRATEGIES["mcts-prm"].preset)
    assert params.value is ValueKind.REWARD_MODEL_ROLLOUT and str(params.granularity) == "step"
    assert load_config(None, **{"value_model.model": "dir"}).value_model.model == "dir"


def test_a_build_runs_a_named_strategy():
    from cluster.config import load_config

    assert load_config(None).build.strategy == "mcts"
    config = load_config(None, **{"build.strategy": "best_of_n"})
    assert config.search_identity()["strategy"] == "best_of_n"
    assert "strategy" not in load_config(None).search_identity()  # outputs of earlier builds keep their hash
    with pytest.raises(ValueError, match="choose from"):
        load_config(None, **{"build.strategy": "beam"})
    with pytest.raises(ValueError, match="needs a value model"):
        load_config(None, **{"build.strategy": "mcts-prm"})
