"""The arithmetic step check (``search.checks``), and the tree search and the baselines using it, against a
SIMULATED engine whose steps write true or false equations."""

import argparse
import asyncio
import itertools
from dataclasses import replace

import numpy as np
import pytest

from cluster.config import load_config
from search import (Budget, Granularity, MCTSParams, NodeKind, StepCheck, ValueKind, best_of_n, build_prompt,
                    run_mcts, self_consistency)
from search.checks import false_equation, passes
from search.driver import StopReason
from search.simulated import SimulatedEngine, SimulatedTokenizer

TOK = SimulatedTokenizer()
PROMPT = TOK.encode(build_prompt("Ann has 1 pen and gets 1 more, three times. How many pens does Ann have?"))
TRUE_STEP, FALSE_STEP = "a 1 + 1 = 2.", "b 1 + 1 = 3."  # the first character says which
STEPS = Granularity("step", 16)


@pytest.mark.parametrize("text, false", [
    ("Fay loses 82, so 123 - 82 = 41.\n\nFay gains 9 × 6 = 54, so 41 + 54 = 95.\n", None),
    ("Fay keeps one of 6 piles, so 41 ÷ 6 = 6 remainder 5, which leaves 6.", None),
    ("Fay keeps one of 6 piles, so 41 ÷ 6 = 7 remainder 5, which leaves 7.", "41 ÷ 6 = 7 remainder 5"),
    ("so 41 ÷ 6 = 6 remainder 7.", "41 ÷ 6 = 6 remainder 7"),  # a remainder must be smaller than the divisor
    ("so 42 / 6 = 7, and 42 ÷ 5 = 8.", "42 ÷ 5 = 8"),  # no remainder: the division must be exact
    ("Dee gains 81, so 137 + 81 = 228.", "137 + 81 = 228"),
    ("3x4=12 and 3 * 4 = 13.", "3 * 4 = 13"),
    ("so 5 - 7 = 2.", "5 - 7 = 2"),
    ("so 1 + 1 = 2 remainder 1.", "1 + 1 = 2 remainder 1"),  # a remainder only after a division
    ("15 ÷ 2 = 7.5 and 1,234 + 5 = 1,239: not whole numbers, not read.", None),
    ("No equation here, only 12 pens.", None),
])
def test_false_equation_finds_the_first_equation_that_does_not_hold(text, false):
    assert false_equation(text) == false


def test_an_unfinished_last_line_is_not_checked_until_the_line_is_complete():
    text = "Ann starts with 123.\n\nAnn loses 82, so 123 - 82 = 4"  # the engine may stop mid-number ("41")
    assert passes(StepCheck.ARITHMETIC, text, complete=False)
    assert not passes(StepCheck.ARITHMETIC, text, complete=True)
    assert not passes(StepCheck.ARITHMETIC, text + "\n", complete=False)
    assert passes(StepCheck.OFF, text + "\n", complete=True)


def test_the_config_names_a_bad_step_check_and_older_builds_keep_their_identity():
    config = load_config(None, **{"search.step_check": "arithmetic", "search.retry_temperature": 0.9})
    params = config.search.to_params()
    assert params.step_check is StepCheck.ARITHMETIC and params.retry_temperature == 0.9
    assert config.search_identity()["search"]["step_check"] == "arithmetic"
    default = load_config(None)
    assert default.search.to_params().step_check is StepCheck.OFF
    assert not {"step_check", "retry_temperature"} & set(default.search_identity()["search"])
    for bad in ({"search.step_check": "calculator"}, {"search.retry_temperature": -1}):
        with pytest.raises(ValueError, match=next(iter(bad)).split(".")[1]):
            load_config(None, **bad)


class EquationEngine(SimulatedEngine):
    """SIMULATED: each step writes ``TRUE_STEP``, or ``FALSE_STEP`` with probability ``false_rate``; the answer is 2
    when every step held, else 3."""

    def __init__(self, *, false_rate: float, pad: str = "", **kwargs):
        super().__init__(TOK, answer=lambda response: "3" if "= 3" in TOK.decode(response.tolist()) else "2",
                         **kwargs)
        self.false_rate = false_rate
        # ``pad`` goes between a step's first character and its equation, to make the line longer
        self._scripts = {text[0]: TOK.encode(text[0] + pad + text[1:]) for text in (TRUE_STEP, FALSE_STEP)}

    def _next_token(self, response: np.ndarray, rng) -> int:
        ids = response.tolist()
        if self._thought not in ids or ids.count(self._delim) >= self.steps:
            return super()._next_token(response, rng)  # <Thought>, or the answer script and EOS
        marker = self._delim if self._delim in ids else self._thought
        since = ids[::-1].index(marker)  # tokens of the step written so far
        if since == 0:
            return self._scripts["b" if rng.random() < self.false_rate else "a"][0]
        script = self._scripts[TOK.decode([ids[-since]])]
        return script[since] if since < len(script) else self._delim


def tree_search(check: StepCheck, value: ValueKind = ValueKind.CHUNK_CONFIDENCE, seed: int = 0,
                granularity: Granularity = STEPS, pad: str = "", max_depth: int = 16):
    params = MCTSParams(granularity=granularity, children=2, value=value, step_check=check, seed=seed,
                        max_depth=max_depth,
                        budget=Budget(iterations=64, tokens=600 + 10 * len(pad)), max_path_tokens=80 + 3 * len(pad))
    engine = EquationEngine(false_rate=0.5, steps=3, seed=seed, pad=pad)
    return asyncio.run(run_mcts(engine, TOK, PROMPT, params))


def first_failed(tree, leaf):
    """The first node on the path to ``leaf`` whose line so far writes a false equation, or None."""
    for node in tree.path(leaf)[1:]:
        if false_equation(TOK.decode(tree.path_token_ids(node).tolist())):
            return node
    return None


@pytest.mark.parametrize("value", [ValueKind.CHUNK_CONFIDENCE, ValueKind.LINE_CONFIDENCE])
def test_a_tree_search_ends_a_line_at_a_step_that_fails_the_check(value):
    """Each of 3 steps is false half the time. Without the check the search may answer through a false step; with
    it, an expanded step that fails ends its line, a rollout that fails is kept but answers nothing, nothing grows
    below a failed step, and the answer comes from a line whose every step holds."""
    answers, failed_rollouts = {StepCheck.OFF: [], StepCheck.ARITHMETIC: []}, 0
    for seed, check in itertools.product(range(4), answers):
        result = tree_search(check, value, seed)
        tree = result.tree
        answers[check].append(result.answer)
        failed = {first_failed(tree, leaf) for leaf in range(1, tree.num_nodes)} - {None}
        if check is StepCheck.OFF:
            assert result.stats.failed_checks == 0
            continue
        assert failed and len(failed) == result.stats.failed_checks
        assert result.answer == "2" and false_equation(result.response) is None
        for node in failed:
            if tree.nodes["kind"][node] == NodeKind.CHUNK:
                assert tree.nodes["is_terminal"][node] and tree.nodes["num_children"][node] == 0
            else:  # a rollout's step: the rollout goes on below it, and nothing else
                assert tree.nodes["kind"][node] == NodeKind.ROLLOUT and tree.nodes["num_children"][node] <= 1
        failed_rollouts += int(np.sum(tree.nodes["kind"][list(failed)] == NodeKind.ROLLOUT))
        assert tree.generated_tokens + result.stats.duplicate_tokens == result.stats.generated_tokens
        assert result.stats.generated_tokens <= 600
    assert "3" in answers[StepCheck.OFF]  # the check changed answers
    assert (value is ValueKind.LINE_CONFIDENCE) == (failed_rollouts > 0)


@pytest.mark.parametrize("pad", ["", " and" * 24])
def test_equations_split_across_mini_steps_are_checked_where_they_end(pad):
    """Mini-steps of 4 tokens cut equations apart; the check reads the line from where it began, whether that is
    within the last 64 tokens or further back (a pad of 96 characters without a newline), and flags a step exactly
    when the line up to it first writes a false equation."""
    for seed in range(3):
        result = tree_search(StepCheck.ARITHMETIC, ValueKind.LINE_CONFIDENCE, seed, Granularity("mini_step", 4), pad,
                             max_depth=128)
        tree = result.tree
        flagged = [node for node in range(1, tree.num_nodes) if first_flagged(tree, node)]
        assert flagged and len(flagged) == result.stats.failed_checks
        # the equations were cut apart: some flagged mini-step does not hold a whole one
        assert not all(false_equation(TOK.decode(tree.node_token_ids(node).tolist())) for node in flagged)


def first_flagged(tree, node) -> bool:
    """Whether the line up to ``node`` fails the check (an unfinished last line aside) and its parent's passed."""
    def fails(k):
        text = TOK.decode(tree.path_token_ids(k).tolist())
        return not passes(StepCheck.ARITHMETIC, text, complete=bool(tree.nodes["is_terminal"][k]))

    parent = int(tree.nodes["parent"][node])
    return fails(node) and not (parent > 0 and fails(parent))


@pytest.mark.parametrize("strategy", [best_of_n, self_consistency])
def test_the_sampling_baselines_choose_among_the_samples_that_pass(strategy):
    for seed in range(3):
        params = MCTSParams(step_check=StepCheck.ARITHMETIC, seed=seed, temperature=1.0, max_path_tokens=80,
                            budget=Budget(tokens=600))
        result = asyncio.run(strategy(EquationEngine(false_rate=0.3, steps=3, seed=seed), TOK, PROMPT, params))
        samples = [TOK.decode(result.tree.node_token_ids(k).tolist()) for k in result.tree.children(0)]
        failing = sum(1 for text in samples if false_equation(text))
        assert 0 < failing < len(samples), "the seed must give passing and failing samples"
        assert result.stats.failed_checks == failing
        assert false_equation(result.response) is None and result.answer == "2"


def test_with_no_sample_passing_the_baseline_still_answers():
    params = MCTSParams(step_check=StepCheck.ARITHMETIC, seed=0, max_path_tokens=80, budget=Budget(tokens=300))
    result = asyncio.run(best_of_n(EquationEngine(false_rate=1.0, steps=3), TOK, PROMPT, params))
    assert result.answer == "3" and result.stats.failed_checks == len(result.tree.children(0))



def test_a_node_whose_step_failed_samples_again_at_the_retry_temperature():
    """A model that erred at a step often errs again from the same prefix at a low temperature, so a tree search
    samples the step again at ``retry_temperature``; every other request keeps the sampling temperature."""
    for retry in (None, 1.0):
        params = MCTSParams(granularity=Granularity("step", 16), children=2, value=ValueKind.LINE_CONFIDENCE,
                            step_check=StepCheck.ARITHMETIC, retry_temperature=retry, temperature=0.3, seed=1,
                            budget=Budget(iterations=64, tokens=600), max_path_tokens=80)
        engine = EquationEngine(false_rate=0.5, steps=3, seed=1)
        tree = asyncio.run(run_mcts(engine, TOK, PROMPT, params)).tree
        failed_parents = {tuple(tree.prompt_for(int(tree.nodes["parent"][node])))
                          for node in {first_failed(tree, leaf) for leaf in range(1, tree.num_nodes)} - {None}}
        hot = [tuple(r.prompt_token_ids) for r in engine.requests if r.temperature == 1.0]
        if retry is None:
            assert not hot and {r.temperature for r in engine.requests} == {0.3}
            continue
        assert hot and set(hot) <= failed_parents
        assert all("\n\n" in r.stop for r in engine.requests if r.temperature == 1.0)  # one step, not a rollout
    with pytest.raises(ValueError, match="retry_temperature"):
        MCTSParams(retry_temperature=-1.0)


def test_a_tree_search_told_the_reference_stops_at_its_first_right_line_that_holds():
    """``stop_when_right``: a build that has the reference ends the tree at its first finished line answering it
    and passing the check, and answers with that line; a line that reaches the reference through a false step does
    not stop it, and without a reference the setting changes nothing."""
    for seed in range(4):
        params = MCTSParams(granularity=STEPS, children=2, value=ValueKind.LINE_CONFIDENCE,
                            step_check=StepCheck.ARITHMETIC, seed=seed, budget=Budget(iterations=64, tokens=600),
                            max_path_tokens=80)

        def search(reference, stop, params=params, seed=seed):
            engine = EquationEngine(false_rate=0.5, steps=3, seed=seed)
            return asyncio.run(run_mcts(engine, TOK, PROMPT, replace(params, stop_when_right=stop),
                                        reference=reference))

        full, right = search("2", False), search("2", True)
        assert right.stop_reason is StopReason.RIGHT and right.answer == "2"
        assert false_equation(right.response) is None
        assert right.stats.generated_tokens < full.stats.generated_tokens
        no_reference = search(None, True)
        assert no_reference.stats.generated_tokens == full.stats.generated_tokens
        assert no_reference.stop_reason is full.stop_reason
        # "3" is only ever reached through a false step, which the check ends
        assert search("3", True).stop_reason is not StopReason.RIGHT


@pytest.mark.parametrize("strategy", [best_of_n, self_consistency])
def test_a_sampling_baseline_told_the_reference_stops_after_the_round_with_a_right_sample(strategy):
    """With ``stop_when_right`` the baselines draw rounds of at most ``parallel`` samples (as a tree search has that
    many requests in flight) and stop after the first round holding a sample that answers the reference and passes
    the check; that sample is the response."""
    for seed in range(3):
        params = MCTSParams(step_check=StepCheck.ARITHMETIC, seed=seed, temperature=1.0, max_path_tokens=80,
                            budget=Budget(tokens=1200), parallel=2)
        engine = EquationEngine(false_rate=0.4, steps=3, seed=seed)
        full = asyncio.run(strategy(EquationEngine(false_rate=0.4, steps=3, seed=seed), TOK, PROMPT, params))
        result = asyncio.run(strategy(engine, TOK, PROMPT, replace(params, stop_when_right=True), reference="2"))
        assert result.stop_reason is StopReason.RIGHT and result.answer == "2"
        assert false_equation(result.response) is None
        assert all(r.n <= 2 for r in engine.requests)
        last_round = [TOK.decode(result.tree.node_token_ids(k).tolist())
                      for k in result.tree.children(0)[-engine.requests[-1].n:]]
        earlier = [TOK.decode(result.tree.node_token_ids(k).tolist())
                   for k in result.tree.children(0)[:-engine.requests[-1].n]]
        assert all(false_equation(text) for text in earlier)  # no right sample before the last round
        assert any(not false_equation(text) for text in last_round)
        assert result.stats.generated_tokens < full.stats.generated_tokens


def test_stop_when_right_is_a_build_setting_left_out_of_older_builds_identity_and_refused_by_eval():
    from dataset.problems import Problem
    from deploy.evaluate import EvalError, run_eval
    from deploy.flags import add_build_flags, overrides

    parser = argparse.ArgumentParser()
    add_build_flags(parser)
    on = load_config(None, **overrides(parser.parse_args(["--stop-when-right"])))
    assert on.search.to_params().stop_when_right and on.search_identity()["search"]["stop_when_right"]
    off = load_config(None, **overrides(parser.parse_args([])))
    assert not off.search.to_params().stop_when_right and "stop_when_right" not in off.search_identity()["search"]
    with pytest.raises(EvalError, match="stop_when_right reads the reference"):
        run_eval(on, [Problem("p", "q", "1")], ["greedy"], budgets=[on.search.max_path_tokens])
