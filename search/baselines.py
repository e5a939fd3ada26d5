"""Baselines in the same framework as the tree search: same engine protocol, same token accounting.

Each samples complete responses as children of a one-level tree and picks one:
greedy chain-of-thought (temperature 0, one sample), best-of-N (highest mean token confidence),
self-consistency (majority vote of extracted answers; ties go to the more confident answer).
"""

from __future__ import annotations

import collections
import time

import numpy as np

from search.driver import SearchResult, SearchStats, StopReason
from search.prompts import OUTPUT_END, extract_answer, normalize_answer
from search.protocol import Engine, GenerationRequest, Tokenizer
from search.tree import ROOT, Tree


async def _sample(engine: Engine, tokenizer: Tokenizer, prompt_token_ids, *, n: int, max_tokens: int,
                  budget_tokens: int | None, temperature: float, top_p: float, seed: int | None,
                  request_id: str) -> tuple[Tree, SearchStats]:
    if budget_tokens is not None:
        max_tokens = min(max_tokens, budget_tokens // n)
    if n < 1 or max_tokens < 1:
        raise ValueError(f"n={n}, max_tokens={max_tokens}: need n >= 1 and a token budget of at least n")
    start = time.monotonic()
    tree = Tree(prompt_token_ids, max_children=n)
    request = GenerationRequest(np.asarray(prompt_token_ids, dtype=np.int32), max_tokens=max_tokens, n=n,
                                temperature=temperature, top_p=top_p, seed=seed, stop=(OUTPUT_END,),
                                request_id=request_id)
    chunks = await engine.generate(request)
    for chunk in chunks:
        tree.nodes["is_terminal"][tree.add_chunk(ROOT, chunk)] = True
    stats = SearchStats(iterations=1, generated_tokens=sum(len(c) for c in chunks),
                        prompt_tokens=len(request.prompt_token_ids), requests=1,
                        cached_prompt_tokens=chunks[0].num_cached_tokens if chunks else 0,
                        seconds=time.monotonic() - start)
    return tree, stats


def _most_confident(tree: Tree) -> int:
    kids = tree.children(ROOT)
    confidence = np.nan_to_num(tree.nodes["confidence"][kids].astype(np.float64), nan=-np.inf)
    return int(kids[np.argmax(confidence)])


def _result(tree: Tree, node: int, stats: SearchStats, tokenizer: Tokenizer) -> SearchResult:
    ids = tree.path_token_ids(node)
    response = tokenizer.decode(ids.tolist())
    return SearchResult(tree, [ROOT, node], ids, response, extract_answer(response),
                        float(tree.nodes["confidence"][node]), StopReason.EXHAUSTED, stats)


async def greedy(engine: Engine, tokenizer: Tokenizer, prompt_token_ids, *, max_tokens: int,
                 budget_tokens: int | None = None, request_id: str = "greedy") -> SearchResult:
    tree, stats = await _sample(engine, tokenizer, prompt_token_ids, n=1, max_tokens=max_tokens,
                                budget_tokens=budget_tokens, temperature=0.0, top_p=1.0, seed=None,
                                request_id=request_id)
    return _result(tree, 1, stats, tokenizer)


async def best_of_n(engine: Engine, tokenizer: Tokenizer, prompt_token_ids, *, n: int, max_tokens: int,
                    budget_tokens: int | None = None, temperature: float = 1.0, top_p: float = 1.0,
                    seed: int | None = None, request_id: str = "best_of_n") -> SearchResult:
    tree, stats = await _sample(engine, tokenizer, prompt_token_ids, n=n, max_tokens=max_tokens,
                                budget_tokens=budget_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                request_id=request_id)
    return _result(tree, _most_confident(tree), stats, tokenizer)


async def self_consistency(engine: Engine, tokenizer: Tokenizer, prompt_token_ids, *, n: int, max_tokens: int,
                           budget_tokens: int | None = None, temperature: float = 1.0, top_p: float = 1.0,
                           seed: int | None = None, request_id: str = "self_consistency") -> SearchResult:
    tree, stats = await _sample(engine, tokenizer, prompt_token_ids, n=n, max_tokens=max_tokens,
                                budget_tokens=budget_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                request_id=request_id)
    votes: dict[str, list[int]] = collections.defaultdict(list)
    for node in tree.children(ROOT):
        answer = extract_answer(tokenizer.decode(tree.node_token_ids(node).tolist()))
        if answer is not None:
            votes[normalize_answer(answer)].append(int(node))
    if not votes:  # nobody answered: fall back to the most confident sample
        return _result(tree, _most_confident(tree), stats, tokenizer)
    conf = tree.nodes["confidence"]
    winner = max(votes.values(), key=lambda nodes: (len(nodes), float(np.nansum(conf[nodes]))))
    return _result(tree, max(winner, key=lambda node: conf[node]), stats, tokenizer)

