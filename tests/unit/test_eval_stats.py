"""The statistics and tables ``forest eval`` reports, and its strategy list."""

import math

import numpy as np
import pytest

from deploy.evaluate import (EvalError, StrategyReport, auroc, format_markdown, format_table, parse_strategies,
                             wilson_interval)


def test_wilson_interval():
    low, high = wilson_interval(50, 100)
    assert low < 0.5 < high and high - low == pytest.approx(0.192, abs=0.005)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_auroc_against_pairwise_definition():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(60), 1)  # many ties
    labels = rng.random(60) < 0.4
    pos, neg = scores[labels], scores[~labels]
    pairwise = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert auroc(scores, labels) == pytest.approx(pairwise)
    assert auroc([0.9, 0.8, 0.1], [True, True, False]) == 1.0
    assert auroc([float("nan"), 0.5], [False, True]) == 1.0  # unvalued ranks lowest
    assert auroc([0.1, 0.2], [True, True]) is None


def test_strategies_are_checked():
    assert parse_strategies("greedy, mcts-mini32") == ["greedy", "mcts-mini32"]
    with pytest.raises(EvalError, match="unknown.*'beam'"):
        parse_strategies("greedy,beam")


def test_tables_show_every_strategy():
    reports = [StrategyReport("greedy", 10, 4, 0.4, 0.17, 0.69, 80.0, 3.2, None, 512),
               StrategyReport("mcts-step", 10, 6, 0.6, 0.31, 0.83, 400.0, 9.9, 0.75, 512)]
    table, markdown = format_table(reports), format_markdown(reports)
    for name in ("greedy", "mcts-step"):
        assert name in table and f"| {name} |" in markdown
    assert "60.0% (6/10)" in markdown and "0.750" in table and "n/a" in table
    assert not math.isnan(reports[1].auroc)
