"""A separable toy task for value-model training: a line is right exactly when its middle step holds ``GOOD``."""

import numpy as np

from dataset.value_labels import ValueExample

GOOD, BAD = 300, 301


def toy_lines(n: int, seed: int = 0) -> list[ValueExample]:
    """``n`` lines of 12 tokens with step ends at 3, 6 and 11; odd-numbered ones are right."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        right = bool(i % 2)
        tokens = np.concatenate([rng.integers(400, 600, 6), [GOOD if right else BAD], rng.integers(400, 600, 5)])
        lines.append(ValueExample(f"p{i}", tokens.astype(np.int32), np.array([3, 6, 11]),
                                  np.array([0.5, float(right), float(right)], dtype=np.float32), right))
    return lines
