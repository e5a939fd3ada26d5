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


@pytest.mark.parametrize("granularity", ["step", "mini_step:16", "mini_step:4"])
def test_answers_read_from_the_line_tail_equal_those_of_the_whole_line(granularity):
    """The search reads a line's answer from the text after its first answer tag; it finds what decoding the
    whole line finds, for every valued line."""
    from search import final
    from search.driver import _Search

    for seed in range(3):
        params = MCTSParams(budget=Budget(iterations=24), seed=seed, granularity=Granularity.parse(granularity),
                            max_depth=64, max_path_tokens=1000)
        search = _Search(SimulatedEngine(TOK, seed=seed, steps=4), TOK, TOK.encode(build_prompt(f"tail {seed}")),
                         params, None, "", lambda: 0.0)
        asyncio.run(search.run())
        answered = {leaf: answer for leaf, answer in search._answers.items() if answer is not None}
        assert answered, "some lines must end with an answer"
        for leaf, answer in search._answers.items():
            whole = TOK.decode(search.tree.path_token_ids(leaf).tolist())
            assert answer == final.line_answer(search.tree, leaf, whole)


def test_an_answer_tag_split_across_chunks_is_still_read():
    """One character per token, chunks cut inside both tags: the overlap with the parent's tokens keeps them."""
    from search.driver import _Search
    from search.protocol import TOP_K, Chunk, FinishReason

    search = _Search(SimulatedEngine(TOK), TOK, TOK.encode(build_prompt("split")), MCTSParams(max_depth=16), None,
                     "", lambda: 0.0)
    node = 0
    for piece in ["Ann has 42.\n<Out", "put>4", "2</Out", "put>"]:
        ids = np.array([TOK.ids[c] for c in piece], dtype=np.int32)
        zeros = np.zeros((len(ids), TOP_K), dtype=np.float32)
        chunk = Chunk(ids, np.zeros(len(ids), dtype=np.float32), zeros.astype(np.int32), zeros, FinishReason.STOP, 0)
        node, _ = search._add_child(node, chunk)
    assert search._finished_line(node)[0] == "42"


if __name__ == "__main__":
    print({name: fingerprint(name) for name in sorted(CASES)})
