import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from search.confidence import mean_confidence, token_confidence


def pytest_approx(x):
    return pytest.approx(x, rel=1e-5)

TOP = np.log(np.array([[0.5, 0.2, 0.1, 0.1, 0.05]], dtype=np.float32))
TOP_IDS = np.array([[7, 3, 9, 1, 4]], dtype=np.int32)


def test_sampled_in_top5_is_its_share_of_the_top5_mass():
    c = token_confidence(np.array([7]), np.log(np.array([0.5])), TOP_IDS, TOP)
    assert c[0] == pytest_approx(0.5 / 0.95)


def test_sampled_outside_top5_is_a_sixth_term_of_the_denominator():
    c = token_confidence(np.array([42]), np.log(np.array([0.01])), TOP_IDS, TOP)
    assert c[0] == pytest_approx(0.01 / 0.96)


def test_mean_ignores_forced_tokens_and_is_nan_without_any():
    assert mean_confidence(np.array([0.2, np.nan, 0.4])) == pytest_approx(0.3)
    assert math.isnan(mean_confidence(np.array([np.nan])))
    assert token_confidence(np.zeros(0), np.zeros(0), np.zeros((0, 5)), np.zeros((0, 5))).shape == (0,)


def test_extreme_logprobs_stay_finite():
    top = np.array([[-1e4, -1e4 - 1, -1e4 - 2, -1e4 - 3, -1e4 - 4]])
    c = token_confidence(np.array([5]), np.array([-1e4]), np.array([[5, 1, 2, 3, 4]]), top)
    assert 0 < c[0] <= 1 and np.isfinite(c[0])


logprob = st.floats(min_value=-50, max_value=0, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(top=st.lists(logprob, min_size=5, max_size=5), sampled=logprob, in_top=st.booleans(),
       rank=st.integers(0, 4), shift=st.floats(min_value=-100, max_value=100))
def test_confidence_properties(top, sampled, in_top, rank, shift):
    top_lp = np.array([sorted(top, reverse=True)])
    ids = np.array([[10, 11, 12, 13, 14]])
    token = np.array([10 + rank if in_top else 99])
    lp = np.array([top_lp[0, rank] if in_top else sampled])
    c = token_confidence(token, lp, ids, top_lp)
    assert 0 < c[0] <= 1 + 1e-12
    if in_top:
        p = np.exp(top_lp[0])
        assert c[0] == pytest_approx(p[rank] / p.sum())
    shifted = token_confidence(token, lp + shift, ids, top_lp + shift)
    assert shifted[0] == pytest_approx(c[0])


def test_an_engine_that_attaches_confidences_gives_the_same_tree_as_one_that_does_not():
    """The worker computes confidences beside the engine (``with_confidences``); the search computes them itself
    for an engine that does not. Both give the very same tree."""
    import asyncio
    import dataclasses

    from search import Budget, MCTSParams, build_prompt, run_mcts
    from search.confidence import with_confidences
    from search.protocol import GenerationRequest
    from search.simulated import SimulatedEngine, SimulatedTokenizer

    class Bare(SimulatedEngine):  # the chunks without their confidences
        async def generate(self, request):
            return [dataclasses.replace(c, confidences=None) for c in await super().generate(request)]

    tok = SimulatedTokenizer()
    prompt = tok.encode(build_prompt("same tree"))
    params = MCTSParams(budget=Budget(iterations=12), seed=3)
    trees = []
    for engine in (SimulatedEngine(tok, seed=1), Bare(tok, seed=1)):
        tree = asyncio.run(run_mcts(engine, tok, prompt, params)).tree
        trees.append({name: column.copy() for name, column in tree.columns().items()})
    assert trees[0].keys() == trees[1].keys()
    for name in trees[0]:
        np.testing.assert_array_equal(trees[0][name], trees[1][name], err_msg=name)
    (sample,) = asyncio.run(SimulatedEngine(tok, seed=1).generate(
        GenerationRequest(np.asarray(prompt), max_tokens=8, seed=1)))
    bare = dataclasses.replace(sample, confidences=None)
    np.testing.assert_array_equal(with_confidences(bare).confidences, sample.confidences)
    assert bare.confidences is None and len(sample.confidences) == len(sample)
