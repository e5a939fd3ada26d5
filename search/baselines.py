"""Baselines in the same framework as the tree search: same engine protocol, same token accounting.

Each samples complete responses (at most ``params.max_path_tokens`` each) as children of a one-level tree and
picks one. The sampling baselines spend the token budget as the tree search does: they keep drawing samples
while the longest sample so far would still fit (the first round assumes the longest possible one).
greedy chain-of-thought (temperature 0, one sample), best-of-N (highest mean token confidence),
self-consistency (majority vote of extracted answers; ties go to the more confident answer), and reward-weighted
best-of-N (``best_of_n-prm``: a value model scores every sample, and the answer with the largest summed score wins,
search-and-learn's weighted best-of-N).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from typing import Callable

import numpy as np

from search import checks
from search.driver import SEED_STRIDE, ProgressCallback, SearchResult, SearchStats, StopReason
from search.mcts import most_confident
from search.params import ConfigError, MCTSParams
from search.prompts import OUTPUT_END, answers_match, extract_answer, normalize_answer
from search.protocol import Engine, GenerationRequest, ScoreRequest, Tokenizer
from search.tree import ROOT, Tree

MAX_SAMPLES = 256  # samples one baseline draws at most (its tree's width)


async def _sample(engine: Engine, prompt_token_ids, params: MCTSParams, *, temperature: float, top_p: float,
                  seed: int | None, request_id: str, on_progress: ProgressCallback | None,
                  spend_budget: bool, is_right: Callable[[Tree, int], bool] | None = None
                  ) -> tuple[Tree, SearchStats, int | None]:
    """Sample whole responses as children of the root: one, or (``spend_budget``) as many as the token budget
    affords, in rounds of ``budget_left // longest`` samples, each allowed ``budget_left // n`` tokens (at most
    ``max_path_tokens``), until the longest sample so far would not fit. ``longest`` starts at
    ``max_path_tokens``: the first round's samples can never be cut by the budget. With ``is_right``
    (``stop_when_right``) a round draws at most ``params.parallel`` samples, as a tree search has that many
    requests in flight, and sampling ends after the first round holding a right sample, which is returned too."""
    if spend_budget and params.budget.tokens is None:
        raise ConfigError("budget_tokens", None, "best-of-N and self-consistency size N from the token budget")
    start = time.monotonic()
    prompt = np.asarray(prompt_token_ids, dtype=np.int32)
    tree = Tree(prompt, max_children=MAX_SAMPLES)
    stats = SearchStats()
    left, seen = params.budget.tokens, 0  # the longest sample so far
    right = None
    while right is None:
        longest = max(seen, 1) if stats.requests else params.max_path_tokens
        n = 1 if left is None else left // longest
        if stats.requests == 0:  # the first round always runs, within the budget
            n = max(n, 1) if spend_budget else 1
        n = min(n, MAX_SAMPLES - tree.num_nodes + 1, MAX_SAMPLES if is_right is None else params.parallel)
        if n < 1:
            break
        max_tokens = params.max_path_tokens if left is None else min(params.max_path_tokens, left // n)
        if max_tokens < 1:
            raise ValueError(f"budget_tokens={params.budget.tokens}: need a token budget of at least one token")
        round_seed = None if seed is None else seed * SEED_STRIDE + stats.requests
        request = GenerationRequest(prompt, max_tokens=max_tokens, n=n, temperature=temperature, top_p=top_p,
                                    seed=round_seed, stop=(OUTPUT_END,), request_id=f"{request_id}-{stats.requests}")
        chunks = await engine.generate(request)
        for chunk in chunks:
            node = tree.add_chunk(ROOT, chunk)  # may grow the node arrays: index them afterwards
            tree.nodes["is_terminal"][node] = True
            if right is None and is_right is not None and is_right(tree, node):
                right = node
        generated = sum(len(c) for c in chunks)
        stats.requests += 1
        stats.generated_tokens += generated
        stats.prompt_tokens += len(prompt)
        stats.cached_prompt_tokens += chunks[0].num_cached_tokens if chunks else 0
        stats.iterations += 1
        if not spend_budget:
            break
        left -= generated
        seen = max(seen, *(len(c) for c in chunks))
    stats.seconds = time.monotonic() - start
    if on_progress is not None:
        on_progress(stats, float(np.nanmax(tree.nodes["confidence"][tree.children(ROOT)], initial=np.nan)))
    return tree, stats, right


async def _samples(engine: Engine, tokenizer: Tokenizer, prompt_token_ids, params: MCTSParams, *,
                   reference: str | None, request_id: str, on_progress: ProgressCallback | None
                   ) -> tuple[Tree, SearchStats, int | None]:
    """A sampling baseline's samples: at the sampling temperature, as many as the budget affords, and with
    ``stop_when_right`` until a right one (also returned)."""
    return await _sample(engine, prompt_token_ids, params, temperature=params.temperature, top_p=params.top_p,
                         seed=params.seed, request_id=request_id, on_progress=on_progress, spend_budget=True,
                         is_right=_right_sample(params, tokenizer, reference))


def _right_sample(params: MCTSParams, tokenizer: Tokenizer, reference: str | None
                  ) -> Callable[[Tree, int], bool] | None:
    """With ``stop_when_right`` and a reference: whether a sample answers the reference and passes the step
    check."""
    if not params.stop_when_right or reference is None:
        return None

    def is_right(tree: Tree, node: int) -> bool:
        text = tokenizer.decode(tree.node_token_ids(node).tolist())
        return answers_match(extract_answer(text), reference) and checks.passes(params.step_check, text,
                                                                                complete=True)
    return is_right


def _candidates(tree: Tree, params: MCTSParams, tokenizer: Tokenizer, stats: SearchStats) -> list[int]:
    """The samples to choose among: those that pass ``params.step_check`` (all of them when none does, so there
    is still an answer); counts the others in ``stats.failed_checks``."""
    samples = [int(k) for k in tree.children(ROOT)]
    passed = [k for k in samples if checks.passes(params.step_check, tokenizer.decode(tree.node_token_ids(k).tolist()),
                                                  complete=True)]
    stats.failed_checks += len(samples) - len(passed)
    return passed or samples


def _most_confident_sample(tree: Tree, candidates: list[int] | None = None) -> int:
    return most_confident(tree, tree.children(ROOT).tolist() if candidates is None else candidates)


def _result(tree: Tree, node: int, stats: SearchStats, tokenizer: Tokenizer,
            reason: StopReason = StopReason.EXHAUSTED) -> SearchResult:
    ids = tree.path_token_ids(node)
    response = tokenizer.decode(ids.tolist())
    return SearchResult(tree, [ROOT, node], ids, response, extract_answer(response),
                        float(tree.nodes["confidence"][node]), reason, stats)


async def greedy(engine: Engine, tokenizer: Tokenizer, prompt_token_ids, params: MCTSParams, *,
                 reference: str | None = None, request_prefix: str = "",
                 on_progress: ProgressCallback | None = None) -> SearchResult:
    """One sample at temperature 0 (``params.seed``, ``temperature`` and ``top_p`` do not apply)."""
    tree, stats, _ = await _sample(engine, prompt_token_ids, params, temperature=0.0, top_p=1.0, seed=None,
                                   request_id=f"{request_prefix}greedy", on_progress=on_progress, spend_budget=False)
    return _result(tree, 1, stats, tokenizer)


async def best_of_n(engine: Engine, tokenizer: Tokenizer, prompt_token_ids, params: MCTSParams, *,
                    reference: str | None = None, request_prefix: str = "",
                    on_progress: ProgressCallback | None = None) -> SearchResult:
    tree, stats, right = await _samples(engine, tokenizer, prompt_token_ids, params, reference=reference,
                                        request_id=f"{request_prefix}best_of_n", on_progress=on_progress)
    if right is not None:
        return _result(tree, right, stats, tokenizer, StopReason.RIGHT)
    return _result(tree, _most_confident_sample(tree, _candidates(tree, params, tokenizer, stats)), stats, tokenizer)


async def self_consistency(engine: Engine, tokenizer: Tokenizer, prompt_token_ids, params: MCTSParams, *,
                           reference: str | None = None, request_prefix: str = "",
                           on_progress: ProgressCallback | None = None) -> SearchResult:
    tree, stats, right = await _samples(engine, tokenizer, prompt_token_ids, params, reference=reference,
                                        request_id=f"{request_prefix}self_consistency", on_progress=on_progress)
    if right is not None:
        return _result(tree, right, stats, tokenizer, StopReason.RIGHT)
    votes: dict[str, list[int]] = collections.defaultdict(list)
    candidates = _candidates(tree, params, tokenizer, stats)
    for node in candidates:
        answer = extract_answer(tokenizer.decode(tree.node_token_ids(node).tolist()))
        if answer is not None:
            votes[normalize_answer(answer)].append(node)
    if not votes:  # nobody answered: fall back to the most confident sample
        return _result(tree, _most_confident_sample(tree, candidates), stats, tokenizer)
    conf = tree.nodes["confidence"]
    winner = max(votes.values(), key=lambda nodes: (len(nodes), float(np.nansum(conf[nodes]))))
    return _result(tree, max(winner, key=lambda node: conf[node]), stats, tokenizer)


async def best_of_n_prm(engine: Engine, tokenizer: Tokenizer, prompt_token_ids, params: MCTSParams, *,
                        reference: str | None = None, request_prefix: str = "",
                        on_progress: ProgressCallback | None = None) -> SearchResult:
    """Best-of-N weighted by a value model: every sample is scored at its end (``engine`` is also a ``Scorer``),
    the scores are summed per answer, and the best-scored sample giving the winning answer is the response."""
    if not callable(getattr(engine, "score", None)):
        raise ConfigError("strategy", "best_of_n-prm", "needs a value model, and this engine has no scorer "
                                                       "(set value_model in the config)")
    tree, stats, right = await _samples(engine, tokenizer, prompt_token_ids, params, reference=reference,
                                        request_id=f"{request_prefix}best_of_n-prm", on_progress=on_progress)
    if right is not None:
        return _result(tree, right, stats, tokenizer, StopReason.RIGHT)
    kids = _candidates(tree, params, tokenizer, stats)
    answers = [extract_answer(tokenizer.decode(tree.node_token_ids(k).tolist())) for k in kids]
    answered = [(k, a) for k, a in zip(kids, answers, strict=True) if a is not None]
    if not answered:
        return _result(tree, _most_confident_sample(tree, kids), stats, tokenizer)
    requests = [ScoreRequest(ids := tree.prompt_for(k), (len(ids) - 1,), request_id=f"{request_prefix}v{i}",
                             prompt_tokens=len(tree.prompt_token_ids)) for i, (k, _) in enumerate(answered)]
    scores = [float(np.asarray(s)[-1]) for s in await asyncio.gather(*(engine.score(r) for r in requests))]
    stats.value_requests += len(requests)
    weight: dict[str, float] = collections.defaultdict(float)
    for (node, answer), score in zip(answered, scores, strict=True):
        weight[normalize_answer(answer)] += score
        tree.nodes["value_sum"][node], tree.nodes["visits"][node] = score, 1
    winner = max(weight, key=weight.get)
    best = max((i for i, (_, a) in enumerate(answered) if normalize_answer(a) == winner), key=scores.__getitem__)
    result = _result(tree, answered[best][0], stats, tokenizer)
    return dataclasses.replace(result, value=scores[best])
