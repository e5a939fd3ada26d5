"""``forest eval``: search strategies compared on problems with known answers, at one token budget.

Every strategy gets the same generated-token budget per problem (``--budget-tokens``) and the same longest path
(``search.max_path_tokens``): the sampling baselines draw ``budget // max_path_tokens`` samples, MCTS stops when
its budget is spent (or earlier, once its answer is settled). Greedy draws one sample whatever the budget.
Reported per strategy: accuracy with a 95% Wilson interval, mean generated tokens, wall time for the whole set, and
the AUROC of the chosen answer's value (its confidence) as a predictor of being right.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cluster.config import ForestConfig
from search.params import Budget, MCTSParams
from search.prompts import answers_match, prompt_token_ids
from search.strategies import STRATEGIES, Strategy

if TYPE_CHECKING:
    from actors.pool import WorkerPool
    from dataset.problems import Problem

MAX_MCTS_ITERATIONS = 1024  # high enough that the token budget, not the iteration count, stops the search


class EvalError(ValueError):
    pass


def parse_strategies(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown or not names:
        raise EvalError(f"--strategies: unknown {unknown or text!r}; choose from {', '.join(STRATEGIES)}")
    return names


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sensible near 0 and 1, unlike the normal approximation)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


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


@dataclass(frozen=True, slots=True)
class StrategyReport:
    strategy: str
    problems: int
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    mean_tokens: float
    wall_seconds: float
    auroc: float | None
    budget_tokens: int

    def row(self) -> dict:
        return dataclasses.asdict(self)


def eval_params(config: ForestConfig, strategy: Strategy, budget_tokens: int, seed: int) -> MCTSParams:
    """The configured search with the strategy's granularity, the token budget (which, not the iteration count,
    stops every strategy) and the problem's seed."""
    params = config.search.to_params(granularity=strategy.granularity)
    return dataclasses.replace(params, seed=seed,
                               budget=Budget(MAX_MCTS_ITERATIONS, budget_tokens, params.budget.seconds))


async def evaluate_strategy(name: str, problems: list[Problem], pool: WorkerPool, tokenizer, config: ForestConfig,
                            *, budget_tokens: int, concurrency: int) -> StrategyReport:
    """Solve every problem with one strategy, ``concurrency`` searches at a time, on the pool's workers."""
    strategy = STRATEGIES[name]
    gate = asyncio.Semaphore(concurrency)
    prompts = [prompt_token_ids(tokenizer, p.question, system_prompt=config.search.system_prompt) for p in problems]

    async def one(index: int):
        async with gate:
            params = eval_params(config, strategy, budget_tokens, seed=index)
            return await pool.search(strategy, tokenizer, prompts[index], params)

    start = time.monotonic()
    results = await asyncio.gather(*(one(i) for i in range(len(problems))))
    wall = time.monotonic() - start
    right = [answers_match(r.answer, p.answer) for r, p in zip(results, problems, strict=True)]
    low, high = wilson_interval(sum(right), len(problems))
    return StrategyReport(name, len(problems), sum(right), sum(right) / len(problems), low, high,
                          float(np.mean([r.stats.generated_tokens for r in results])), wall,
                          auroc([r.value for r in results], right), budget_tokens)


def run_eval(config: ForestConfig, problems: list[Problem], strategies: list[str], *, budget_tokens: int,
             concurrency: int = 64, on_report=None) -> list[StrategyReport]:
    """Start the workers once, then evaluate each strategy in turn (one at a time, so wall times compare)."""
    from actors.pool import open_pool

    missing = [p.problem_id for p in problems if p.answer is None]
    if missing:
        raise EvalError(f"problems without an answer cannot be scored: {', '.join(missing[:5])}"
                        + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if not problems:
        raise EvalError("no problems to evaluate")
    if budget_tokens < config.search.max_path_tokens:
        raise EvalError(f"--budget-tokens {budget_tokens} is below search.max_path_tokens "
                        f"({config.search.max_path_tokens}): no strategy could finish one path")
    with open_pool(config) as pool:

        async def go():
            workers = pool.worker_pool()
            reports = []
            for strategy in strategies:
                report = await evaluate_strategy(strategy, problems, workers, pool.tokenizer, pool.config,
                                                 budget_tokens=budget_tokens, concurrency=concurrency)
                if on_report:
                    on_report(report)
                reports.append(report)
            return reports

        return asyncio.run(go())


def format_table(reports: list[StrategyReport]) -> str:
    lines = [f"{'strategy':<18} {'accuracy':>8}  {'95% CI':<13} {'tokens':>7} {'wall s':>7} {'AUROC':>6}"]
    for r in reports:
        auc = "n/a" if r.auroc is None else f"{r.auroc:.3f}"
        lines.append(f"{r.strategy:<18} {100 * r.accuracy:>7.1f}%  {100 * r.ci_low:>5.1f}-{100 * r.ci_high:<5.1f}% "
                     f"{r.mean_tokens:>7.1f} {r.wall_seconds:>7.1f} {auc:>6}")
    return "\n".join(lines)


def format_markdown(reports: list[StrategyReport]) -> str:
    lines = ["| strategy | accuracy | 95% CI | mean generated tokens | wall time (s) | confidence AUROC |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in reports:
        auc = "n/a" if r.auroc is None else f"{r.auroc:.3f}"
        lines.append(f"| {r.strategy} | {100 * r.accuracy:.1f}% ({r.correct}/{r.problems}) | "
                     f"{100 * r.ci_low:.1f}-{100 * r.ci_high:.1f}% | {r.mean_tokens:.1f} | {r.wall_seconds:.1f} | "
                     f"{auc} |")
    return "\n".join(lines)


def report_json(report: StrategyReport) -> str:
    return json.dumps(report.row())
