"""Search parameters: parsing and validation that names the field."""

import pytest

from search.params import Budget, ConfigError, Granularity, MCTSParams, ReflectionMode, ReflectionPolicy


def test_granularity_parsing():
    assert Granularity.parse("step") == Granularity("step", 256, "\n\n")
    assert Granularity.parse("mini_step:64") == Granularity("mini_step", 64, "\n\n")
    assert str(Granularity.parse("mini_step:32")) == "mini_step:32"


def test_reflection_parsing():
    assert ReflectionPolicy.parse("below:0.6") == ReflectionPolicy(ReflectionMode.BELOW, 0.6)
    assert ReflectionPolicy.parse("wrong_answer").mode is ReflectionMode.WRONG_ANSWER
    assert str(ReflectionPolicy.parse("below:0.6")) == "below:0.6"


@pytest.mark.parametrize("make, field", [
    (lambda: Budget(iterations=-1), "iterations"),
    (lambda: Budget(tokens=-5), "budget_tokens"),
    (lambda: Budget(seconds=-1.0), "budget_seconds"),
    (lambda: Granularity.parse("paragraph"), "granularity"),
    (lambda: Granularity.parse("mini_step:0"), "granularity"),
    (lambda: Granularity.parse("mini_step:abc"), "granularity"),
    (lambda: MCTSParams(children=0), "children"),
    (lambda: MCTSParams(exploration=-1.0), "exploration"),
    (lambda: MCTSParams(top_p=0.0), "top_p"),
    (lambda: ReflectionPolicy.parse("sometimes"), "reflection"),
    (lambda: ReflectionPolicy.parse("below:high"), "reflection"),
    (lambda: ReflectionPolicy.parse("below:1.5"), "reflection"),
])
def test_bad_values_name_the_field(make, field):
    with pytest.raises(ConfigError) as err:
        make()
    assert err.value.field == field
    assert str(err.value).startswith(field)
