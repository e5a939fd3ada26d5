"""Marco-o1's token confidence.

For position i with sampled token t_i and the engine's top-5 alternatives t_1..t_5::

    c_i = exp(lp(t_i)) / sum_{j in top5(i)} exp(lp(t_j))

The paper does not say what happens when the sampled token is not among the top-5 (possible when sampling
with temperature or top-p). We then count it as a sixth term of the denominator, so c_i stays in (0, 1]
instead of exceeding 1. The computation subtracts the row maximum first, so it is stable for any logprobs
and invariant to adding a constant to all of them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from search.protocol import Chunk


def token_confidence(
    token_ids: np.ndarray, logprobs: np.ndarray, top_ids: np.ndarray, top_logprobs: np.ndarray
) -> np.ndarray:
    """Per-token confidence, float64 [T], from token_ids/logprobs [T] and top_ids/top_logprobs [T, K]."""
    lp = np.asarray(logprobs, dtype=np.float64)
    if lp.size == 0:
        return np.zeros(0, dtype=np.float64)
    top = np.asarray(top_logprobs, dtype=np.float64)
    peak = top.max(axis=1)
    np.maximum(peak, lp, out=peak)
    sampled = np.exp(lp - peak)
    denom = np.exp(top - peak[:, None]).sum(axis=1)
    outside = (np.asarray(top_ids) != np.asarray(token_ids)[:, None]).all(axis=1)
    denom += sampled * outside  # the sampled token as a sixth term when it is not in the top-5
    return sampled / denom


def chunk_token_confidence(chunk: Chunk) -> np.ndarray:
    """The chunk's token confidences: as its engine computed them, else computed here."""
    if chunk.confidences is not None:
        return chunk.confidences
    return token_confidence(chunk.token_ids, chunk.logprobs, chunk.top_ids, chunk.top_logprobs)


def with_confidences(chunk: Chunk) -> Chunk:
    """``chunk`` carrying its token confidences. Engine adapters call this where a chunk is made, so the work runs
    in the worker, beside the engine, and not on the tree manager's one core."""
    return dataclasses.replace(chunk, confidences=chunk_token_confidence(chunk))


def generated_sum(confidences: np.ndarray) -> tuple[float, int]:
    """(sum, count) of the confidences of the tokens that were generated (forced tokens carry NaN)."""
    total = confidences.sum()
    if total == total:  # no NaN: every token counts (the common case, without a mask)
        return total, confidences.size
    valid = confidences[~np.isnan(confidences)]
    return valid.sum(), valid.size


def mean_confidence(confidences: np.ndarray) -> float:
    """Mean over the tokens that were generated; NaN when there are none."""
    total, count = generated_sum(confidences)
    return float(total / count) if count else float("nan")  # what .mean() computes, less overhead
