"""The statistics and tables ``forest eval`` reports, and its strategy list."""

import math
from types import SimpleNamespace

import numpy as np
import pytest

from deploy.evaluate import (EvalError, StrategyReport, accepted_lines, format_markdown, format_table, mcnemar_p,
                             paired_difference, parse_budgets, parse_strategies, plot, rule_answer, wilson_interval)
from search import final
from search.metrics import auroc
from search.params import FinalChoice, StepCheck
from tests.unit.test_api_models import TOK, handmade_tree


def test_wilson_interval():
    low, high = wilson_interval(50, 100)
    assert low < 0.5 < high and high - low == pytest.approx(0.192, abs=0.005)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_mcnemar_p_is_the_exact_two_sided_binomial_tail():
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(3, 3) == 1.0
    assert mcnemar_p(5, 0) == pytest.approx(2 / 32) and mcnemar_p(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_p(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)


def test_a_paired_difference_counts_the_problems_only_one_got_right_and_brackets_the_difference():
    rng = np.random.default_rng(1)
    second = rng.random(400) < 0.5
    first = second.copy()
    first[np.flatnonzero(~second)[:40]] = True  # 40 more right answers, nothing lost
    d = paired_difference(first, second)
    assert d["difference"] == pytest.approx(0.1) and (d["only_first"], d["only_second"]) == (40, 0)
    assert 0 < d["ci_low"] < 0.1 < d["ci_high"] and d["mcnemar_p"] < 1e-9
    # the paired interval is narrower than the two accuracies' own intervals put together
    separate = (wilson_interval(first.sum(), 400)[1] - wilson_interval(first.sum(), 400)[0]) / 2 * math.sqrt(2)
    assert d["ci_high"] - d["ci_low"] < separate
    assert paired_difference(second, second)["difference"] == 0.0
    with pytest.raises(ValueError, match="same problems"):
        paired_difference(first, second[:10])
    report = StrategyReport("greedy", 2, 1, 0.5, 0.1, 0.9, 10.0, 1.0, None, 64, 0.5, right=(True, False))
    assert "right" not in report.row()


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


RULES = {"vote": 0.6, "best_value": 0.5, "most_visits": 0.4}
REPORTS = [StrategyReport("greedy", 10, 4, 0.4, 0.17, 0.69, 80.0, 3.2, None, 512, 0.4),
           StrategyReport("mcts-step", 10, 6, 0.6, 0.31, 0.83, 400.0, 9.9, 0.75, 512, 0.8, RULES),
           StrategyReport("greedy", 10, 4, 0.4, 0.17, 0.69, 80.0, 3.1, None, 1024, 0.4),
           StrategyReport("mcts-step", 10, 7, 0.7, 0.40, 0.89, 900.0, 19.9, 0.7, 1024, 0.9, RULES)]


def test_tables_show_every_strategy_budget_and_oracle():
    table, markdown = format_table(REPORTS), format_markdown(REPORTS)
    for name in ("greedy", "mcts-step"):
        assert name in table and f"| {name} |" in markdown
    assert "60.0% (6/10)" in markdown and "0.750" in table and "n/a" in table
    assert "| mcts-step | 1024 |" in markdown and "80.0%" in markdown and "60.0 / 50.0 / 40.0" in markdown
    assert not math.isnan(REPORTS[1].auroc)


def test_budgets_are_parsed():
    assert parse_budgets("512, 1024,2048") == [512, 1024, 2048]
    for bad in ("512,lots", "0", ""):
        with pytest.raises(EvalError, match="--budgets"):
            parse_budgets(bad)


def test_the_plot_is_written_as_png_and_svg(tmp_path):
    paths = plot(REPORTS, str(tmp_path / "acc"))
    assert paths == [str(tmp_path / "acc.png"), str(tmp_path / "acc.svg")]
    assert (tmp_path / "acc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = (tmp_path / "acc.svg").read_text()
    assert "<svg" in svg and "mcts-step" in svg and "pass@tree" in svg


def test_eval_refuses_a_reflection_policy_that_reads_the_reference():
    from cluster.config import ForestConfig
    from dataset.problems import Problem
    from deploy.evaluate import run_eval

    config = ForestConfig.model_validate({"search": {"reflection": "wrong_answer"}})
    with pytest.raises(EvalError, match="wrong_answer reads the reference"):
        run_eval(config, [Problem("p", "q", "1")], ["greedy"], budgets=[config.search.max_path_tokens])


def test_eval_refuses_value_model_strategies_without_a_value_model():
    from cluster.config import ForestConfig
    from dataset.problems import Problem
    from deploy.evaluate import run_eval

    config = ForestConfig()
    with pytest.raises(EvalError, match="mcts-prm, best_of_n-prm need a value model"):
        run_eval(config, [Problem("p", "q", "1")], ["greedy", "mcts-prm", "best_of_n-prm"],
                 budgets=[config.search.max_path_tokens])


def test_the_lines_a_report_counts_pass_the_step_check_and_are_decoded_once():
    tree, decoded = handmade_tree(), []

    def decode(ids):
        decoded.append(tuple(ids))
        return TOK.decode(ids)

    # leaves 1-2: a right line and its twin ("1+1=2"), 3: a wrong one ("1+1=3"), 4: cut by a limit
    assert [line.leaf for line in accepted_lines(tree, decode, StepCheck.OFF)] == [1, 2, 3]
    assert len(decoded) == len(set(decoded)) == 3  # four leaves, each text decoded once (the twins share theirs)
    decoded.clear()
    lines = accepted_lines(tree, decode, StepCheck.ARITHMETIC)
    assert [(line.leaf, line.answer) for line in lines] == [(1, "2 apples"), (2, "2 apples")]
    assert len(decoded) == 3  # the check reads the texts already decoded
    # lines the search set aside (min_step_score) are not among what it chose from
    assert [line.leaf for line in accepted_lines(tree, decode, StepCheck.OFF, frozenset({1, 3}))] == [2]


def test_the_rules_answer_among_the_lines_set_aside_when_none_is_accepted():
    tree = handmade_tree()
    set_aside = (final.Line.of(1, "2 apples", 0.2), final.Line.of(3, "3 apples", 0.4))
    result = SimpleNamespace(tree=tree, set_aside=set_aside)
    kept = [final.Line.of(2, "2 apples", 0.9)]
    assert {rule: rule_answer(result, kept, rule) for rule in FinalChoice} == dict.fromkeys(FinalChoice, "2 apples")
    assert rule_answer(result, [], FinalChoice.BEST_VALUE) == "3 apples"  # by their scores
    assert rule_answer(SimpleNamespace(tree=tree, set_aside=()), [], FinalChoice.BEST_VALUE) is None
