"""The same seeds give the same trees: fingerprints of SIMULATED searches recorded before the manager's hot path
was optimised (cumulative path columns, one confidence pass per chunk, vectorised step splitting). A change that
alters any tree, value or answer fails here; a deliberate change of search behaviour re-records them
(``python -m tests.unit.test_same_trees``): "tokens" was re-recorded when rollouts near the end of a token budget
began to be sized by the longest ended line instead of the path limit."""

import asyncio
import hashlib

import numpy as np
import pytest

from search import Budget, MCTSParams, build_prompt, run_mcts
from search.params import Granularity, ReflectionPolicy, ValueKind
from search.simulated import SimulatedEngine, SimulatedTokenizer

TOK = SimulatedTokenizer()
VALUE_DIGITS = 9  # values compared to 1e-9: summation order may move the last bits

CASES = {
    "step": dict(),
    "mini16": dict(granularity=Granularity.parse("mini_step:16")),
    "reflect": dict(reflection=ReflectionPolicy.parse("always"), temperature=1.0),
    "below": dict(reflection=ReflectionPolicy.parse("below:0.7"), children=3, widening=0.5),
    "chunk_value": dict(value=ValueKind.CHUNK_CONFIDENCE),
    "rollout_value": dict(value=ValueKind.ROLLOUT_CONFIDENCE, children=3),
    "tokens": dict(budget=Budget(tokens=600), max_path_tokens=120, max_depth=6),
    "deep": dict(max_depth=4, dedup=False, parallel=1),
}


def fingerprint(name: str) -> str:
    params = MCTSParams(**{"budget": Budget(iterations=24), "seed": 7, **CASES[name]})
    engine = SimulatedEngine(TOK, seed=4, steps=6)
    result = asyncio.run(run_mcts(engine, TOK, TOK.encode(build_prompt(f"case {name}")), params))
    tree, digest = result.tree, hashlib.sha256()
    n = tree.num_nodes
    for column in ("parent", "kind", "visits", "is_terminal", "weight", "token_start", "token_end", "exhausted"):
        digest.update(tree.nodes[column][:n].tobytes())
    digest.update(tree.tokens["token_ids"][: tree.num_tokens].tobytes())
    digest.update(np.round(tree.nodes["value_sum"][:n], VALUE_DIGITS).tobytes())
    digest.update(np.round(tree.nodes["confidence"][:n].astype(np.float64), VALUE_DIGITS).tobytes())
    digest.update(repr((result.path, result.answer, round(result.value, VALUE_DIGITS), result.stop_reason.value,
                        result.stats.generated_tokens, result.stats.iterations)).encode())
    return digest.hexdigest()[:16]


EXPECTED = {"below": "2da791f4342eb4f3", "chunk_value": "c27bf0f341204507", "deep": "97d4c85f427b28f1",
            "mini16": "f9d9b3953f842a62", "reflect": "c61c6d3967becd01", "rollout_value": "429e4e93bcd0c823",
            "step": "ec598c42186c4dfe", "tokens": "f114774bd7829f98"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_same_seeds_give_the_same_trees(name):
    assert fingerprint(name) == EXPECTED[name]


if __name__ == "__main__":
    print({name: fingerprint(name) for name in sorted(CASES)})
