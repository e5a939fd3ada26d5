"""Pure statistics shared by evaluation and value-model training."""

from __future__ import annotations

import numpy as np


def auroc(scores, labels) -> float | None:
    """Probability that a random right answer scores above a random wrong one (ties count half).

    None when only one class is present; NaN scores rank lowest.
    """
    scores = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
    labels = np.asarray(labels, dtype=bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for start, count in zip(first, counts, strict=True):
        ranks[order[start:start + count]] = start + (count + 1) / 2
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def pick_rate(scores, labels, groups) -> float | None:
    """Share of groups (problems) whose highest-scored member is right: the question a search's final choice asks
    of a value, which a pooled ``auroc`` does not (it also rewards telling easy problems from hard ones). The first
    of tied members counts; NaN scores rank lowest; None without members."""
    scores = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
    labels = np.asarray(labels, dtype=bool)
    best: dict = {}
    for i, group in enumerate(groups):
        if group not in best or scores[i] > scores[best[group]]:
            best[group] = i
    return float(np.mean([labels[i] for i in best.values()])) if best else None
