"""Baselines in the same framework as the tree search: same engine protocol, same token accounting.

Each samples complete responses (at most ``params.max_path_tokens`` each, within ``params.budget.tokens``) as
children of a one-level tree and picks one:
greedy chain-of-thought (temperature 0, one sample), best-of-N (highest mean token confidence),
self-consistency (majority vote of extracted answers; ties go to the more confident answer).
"""

from __future__ import annotations

import collections
import time

import numpy as np

from search.driver import ProgressCallback, SearchResult, SearchStats, StopReason
from search.params import ConfigError, MCTSParams
from search.prompts import OUTPUT_END, extract_answer, normalize_answer
from search.protocol import Engine, GenerationRequest, Tokenizer
from search.tree import ROOT, Tree


def _samples(params: MCTSParams) -> int:
    """N for the sampling baselines: as many whole paths as the token budget affords (at least one)."""
    if params.budget.tokens is None:
        raise ConfigError("budget_tokens", None, "best-of-N and self-consistency size N from the token budget")
    return max(1, params.budget.tokens // params.max_path_tokens)


async def _sample(engine: Engine, prompt_token_ids, params: MCTSParams, *, n: int, temperature: float,
                  top_p: float, seed: int | None, request_id: str,
                  on_progress: ProgressCallback | None) -> tuple[Tree, SearchStats]:
    max_tokens = params.max_path_tokens
    if params.budget.tokens is not None:
        max_tokens = min(max_tokens, params.budget.tokens // n)
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
    if on_progress is not None:
        on_progress(stats, float(np.nanmax(tree.nodes["confidence"][tree.children(ROOT)], initial=np.nan)))
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


async def greedy(engine: Engine, tokenizer: Tokenizer, prompt_token_ids, params: MCTSParams, *,
                 reference: str | None = None, request_prefix: str = "",
                 on_progress: ProgressCallback | None = None) -> SearchResult:
    """One sample at temperature 0 (``params.seed``, ``temperature`` and ``top_p`` do not apply)."""
    tree, stats = await _sample(engine, prompt_token_ids, params, n=1, temperature=0.0, top_p=1.0, seed=None,
                                request_id=f"{request_prefix}greedy", on_progress=on_progress)
    return _result(tree, 1, stats, tokenizer)


async def best_of_n(engine: Engine, tokenizer: Tokenizer, prompt_token_ids, params: MCTSParams, *,
                    reference: str | None = None, request_prefix: str = "",
                    on_progress: ProgressCallback | None = None) -> SearchResult:
    tree, stats = await _sample(engine, prompt_token_ids, params, n=_samples(params), temperature=params.temperature,
                                top_p=params.top_p, seed=params.seed, request_id=f"{request_prefix}best_of_n",
                                on_progress=on_progress)
    return _result(tree, _most_confident(tree), stats, tokenizer)


async def self_consistency(engine: Engine, tokenizer: Tokenizer, prompt_token_ids, params: MCTSParams, *,
                           reference: str | None = None, request_prefix: str = "",
                           on_progress: ProgressCallback | None = None) -> SearchResult:
    tree, stats = await _sample(engine, prompt_token_ids, params, n=_samples(params), temperature=params.temperature,
                                top_p=params.top_p, seed=params.seed,
                                request_id=f"{request_prefix}self_consistency", on_progress=on_progress)
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

