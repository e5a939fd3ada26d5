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
