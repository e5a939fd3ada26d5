"""``HFTokenizer`` decodes with the Rust tokenizer directly: the same text as transformers' decode."""

import numpy as np

from actors.tokenizer import HFTokenizer
from search.prompts import build_prompt

BUNDLED_MODEL = "models/forest-arith"


def test_the_fast_decode_gives_transformers_text():
    tokenizer = HFTokenizer(BUNDLED_MODEL)
    assert tokenizer._rust is not None  # the fast path is the one under test
    rng = np.random.default_rng(0)
    ids = tokenizer.encode(build_prompt("Ann has 12 eggs. Then she finds 3 more. How many eggs?")
                           + "<Thought>\nStep 1: 12 + 3 = 15.\n\n</Thought>\n<Output>15</Output>")
    vocab = len(tokenizer.hf)
    cases = [ids, ids[:7], [], [tokenizer.eos_token_id], ids + [tokenizer.eos_token_id] + ids[:5]]
    cases += [rng.integers(0, vocab, size=int(rng.integers(1, 60))).tolist() for _ in range(200)]
    for case in cases:
        assert tokenizer.decode(case) == tokenizer.hf.decode(case, skip_special_tokens=True), case
