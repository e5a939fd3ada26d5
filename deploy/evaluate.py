"""``forest eval``: search strategies compared on problems with known answers, at one or more token budgets.

Every strategy gets the same generated-token budget per problem and the same longest path
(``search.max_path_tokens``): the sampling baselines keep drawing samples until the next would not fit, MCTS stops
when its budget is spent or its tree is exhausted. Greedy draws one sample whatever the budget.
Reported per strategy and budget: accuracy with a 95% Wilson interval, mean generated tokens, wall time for the
whole set, the AUROC of the chosen answer's value as a predictor of being right, and two oracle figures: pass@tree
(a correct finished line exists in the tree or among the samples) and, for MCTS, the accuracy each final-answer
rule would have had on the same trees. ``plot`` draws accuracy against mean tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cluster.config import ForestConfig
from search import final
from search.checks import passes
from search.metrics import auroc
from search.params import Budget, FinalChoice, MCTSParams, StepCheck
from search.prompts import answers_match, prompt_token_ids
from search.strategies import STRATEGIES, Strategy, needs_value_model
from search.tree import NodeKind

if TYPE_CHECKING:
    from actors.pool import WorkerPool
    from dataset.problems import Problem
    from search.driver import SearchResult

MAX_MCTS_ITERATIONS = 1024  # high enough that the token budget, not the iteration count, stops the search
BOOTSTRAP_DRAWS = 10_000  # resamples of the problems behind a paired difference's interval


class EvalError(ValueError):
    pass


def parse_strategies(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown or not names:
        raise EvalError(f"--strategies: unknown {unknown or text!r}; choose from {', '.join(STRATEGIES)}")
    return names


def parse_budgets(text: str) -> list[int]:
    try:
        budgets = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise EvalError(f"--budgets: expected comma-separated token counts, got {text!r}") from None
    if not budgets or min(budgets) < 1:
        raise EvalError(f"--budgets: expected positive token counts, got {text!r}")
    return budgets


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sensible near 0 and 1, unlike the normal approximation)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_p(only_first: int, only_second: int) -> float:
    """Exact two-sided McNemar test: the chance of a split at least this uneven of the problems that exactly one
    of two strategies answered right, were either equally likely to be the one."""
    n = only_first + only_second
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_first, only_second) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def paired_difference(first, second, *, draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> dict:
    """Accuracy of ``first`` minus that of ``second``, given which of the same problems (same order) each got
    right: the difference, its 95% interval from resampling the problems (paired, so what the problems share cancels
    out, and the interval is narrower than two separate ones), how many problems only each got right, and the exact
    McNemar p-value."""
    a, b = np.asarray(first, dtype=np.int8), np.asarray(second, dtype=np.int8)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired results need the same problems: got {a.shape} and {b.shape}")
    diff = a - b
    draws_of = np.random.default_rng(seed).integers(0, a.size, size=(draws, a.size))
    low, high = np.quantile(diff[draws_of].mean(axis=1), [0.025, 0.975])
    only_first, only_second = int((diff == 1).sum()), int((diff == -1).sum())
    return {"difference": float(diff.mean()), "ci_low": float(low), "ci_high": float(high),
            "only_first": only_first, "only_second": only_second, "mcnemar_p": mcnemar_p(only_first, only_second)}


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
    pass_at_tree: float  # share of problems whose tree holds a correct finished line (an oracle's accuracy)
    rule_accuracy: dict[str, float] | None = None  # MCTS: the accuracy each final-answer rule would have had
    line_auroc: float | None = None  # every finished line's value against its correctness, over all problems
    stop_reasons: dict[str, int] | None = None  # how many searches each stop reason ended (why tokens were left)
    reflections: float = 0.0  # forced reflection nodes per tree
    reflected_answers: float = 0.0  # share of problems whose chosen line passes through a reflection
    reflection: str = "off"  # the search's reflection policy (search.reflection)
    step_check: str = StepCheck.OFF.value  # the check every strategy applied to its lines (search.step_check)
    value_model: str | None = None  # the value model the strategy scored with ("DIR (likelihood)": a verifier)
    right: tuple[bool, ...] = ()  # per problem, in the input's order, whether the answer was right (not in row())

    def row(self) -> dict:
        row = dataclasses.asdict(self)
        del row["right"]
        return row


def eval_params(config: ForestConfig, strategy: Strategy, budget_tokens: int, seed: int) -> MCTSParams:
    """The configured search with the strategy's granularity, the token budget (which, not the iteration count,
    stops every strategy) and the problem's seed."""
    params = config.search.to_params(**strategy.preset)
    return dataclasses.replace(params, seed=seed,
                               budget=Budget(MAX_MCTS_ITERATIONS, budget_tokens, params.budget.seconds))


def accepted_lines(tree, decode, check: StepCheck, rejected: frozenset[int] = frozenset()) -> list[final.Line]:
    """The tree's finished lines but those the search set aside (``rejected`` ends); with a step ``check``, those
    that pass it (what a strategy chose among). Each line is decoded once."""
    texts: dict[tuple[int, ...], str] = {}

    def decode_once(ids) -> str:
        key = tuple(ids)
        if key not in texts:
            texts[key] = decode(list(ids))
        return texts[key]

    lines = [line for line in final.finished_lines(tree, decode_once) if line.leaf not in rejected]
    if check is StepCheck.OFF:
        return lines
    return [line for line in lines if passes(check, decode_once(tree.path_token_ids(line.leaf).tolist()),
                                             complete=True)]


async def evaluate_strategy(name: str, problems: list[Problem], pool: WorkerPool, tokenizer, config: ForestConfig,
                            *, budget_tokens: int, concurrency: int, on_problem=None) -> StrategyReport:
    """Solve every problem with one strategy, ``concurrency`` searches at a time, on the pool's workers;
    ``on_problem(result)`` after each one."""
    strategy = STRATEGIES[name]
    gate = asyncio.Semaphore(concurrency)
    prompts = [prompt_token_ids(tokenizer, p.question, system_prompt=config.search.system_prompt) for p in problems]

    async def one(index: int):
        async with gate:
            params = eval_params(config, strategy, budget_tokens, seed=index)
            result = await pool.search(strategy, tokenizer, prompts[index], params)
        if on_problem:
            on_problem(result)
        return result

    start = time.monotonic()
    results = await asyncio.gather(*(one(i) for i in range(len(problems))))
    wall = time.monotonic() - start
    right = [answers_match(r.answer, p.answer) for r, p in zip(results, problems, strict=True)]
    low, high = wilson_interval(sum(right), len(problems))
    check = config.search.step_check
    lines = [accepted_lines(r.tree, tokenizer.decode, check, r.rejected) for r in results]
    in_tree = [any(answers_match(line.answer, p.answer) for line in ls) for ls, p in zip(lines, problems, strict=True)]
    rules = None
    if strategy.search is STRATEGIES["mcts"].search:
        rules = {rule.value: float(np.mean([answers_match(rule_answer(r, ls, rule), p.answer)
                                            for r, ls, p in zip(results, lines, problems, strict=True)]))
                 for rule in FinalChoice}
    return StrategyReport(name, len(problems), sum(right), sum(right) / len(problems), low, high,
                          float(np.mean([r.stats.generated_tokens for r in results])), wall,
                          auroc([r.value for r in results], right), budget_tokens, float(np.mean(in_tree)), rules,
                          auroc([line.value for ls in lines for line in ls],
                                [answers_match(line.answer, p.answer) for ls, p in zip(lines, problems, strict=True)
                                 for line in ls]),
                          dict(sorted(Counter(r.stop_reason.value for r in results).items())),
                          float(np.mean([_reflections(r.tree.nodes["kind"][:r.tree.num_nodes]) for r in results])),
                          float(np.mean([_reflections(r.tree.nodes["kind"][r.path]) > 0 for r in results])),
                          config.search.reflection, check.value, _value_model(config, strategy), tuple(right))


def _value_model(config: ForestConfig, strategy: Strategy) -> str | None:
    """What the report names as the strategy's value model: its directory, marked when read by likelihood."""
    from actors.pool import likelihood

    if config.value_model is None or not needs_value_model(strategy, config.search.to_params(**strategy.preset)):
        return None
    return config.value_model.model + (" (likelihood)" if likelihood(config) is not None else "")


def _reflections(kinds: np.ndarray) -> int:
    return int((kinds == NodeKind.REFLECTION).sum())


def rule_answer(result: SearchResult, lines: list[final.Line], rule: FinalChoice) -> str | None:
    """The answer ``rule`` gives among a search's accepted ``lines``; as the search itself does, among the lines
    its value model set aside (by their scores) when none is accepted."""
    line = final.choose(result.tree, lines, rule, result.set_aside)
    return None if line is None else line.answer


def run_eval(config: ForestConfig, problems: list[Problem], strategies: list[str], *, budgets: list[int],
             concurrency: int = 64, on_report=None) -> list[StrategyReport]:
    """Start the workers once, then evaluate each strategy at each budget in turn (one at a time, so wall times
    compare), with a progress bar (or a log line every few seconds) per run."""
    from actors.pool import open_pool
    from deploy.progress import Progress

    missing = [p.problem_id for p in problems if p.answer is None]
    if missing:
        raise EvalError(f"problems without an answer cannot be scored: {', '.join(missing[:5])}"
                        + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if not problems:
        raise EvalError("no problems to evaluate")
    if config.search.reflection == "wrong_answer":
        raise EvalError("search.reflection: wrong_answer reads the reference answer, which forest eval never gives a "
                        "strategy; use off, always or below:<value>")
    if config.search.stop_when_right:
        raise EvalError("search.stop_when_right reads the reference answer, which forest eval never gives a strategy; "
                        "it is for data builds")
    needs_value = [s for s in strategies
                   if needs_value_model(STRATEGIES[s], config.search.to_params(**STRATEGIES[s].preset))]
    if needs_value and config.value_model is None:
        verb = "needs" if len(needs_value) == 1 else "need"
        raise EvalError(f"{', '.join(needs_value)} {verb} a value model: set value_model.model in the config or "
                        f"pass --value-model")
    if not budgets or min(budgets) < config.search.max_path_tokens:
        raise EvalError(f"every budget ({budgets}) must be at least search.max_path_tokens "
                        f"({config.search.max_path_tokens}): no strategy could finish one path")
    with open_pool(config, value=bool(needs_value)) as pool:

        async def go():
            workers = pool.worker_pool()
            reports = []
            for budget in budgets:
                for strategy in strategies:
                    progress = Progress(len(problems), label=f"eval {strategy} @ {budget} tokens", unit="problem")
                    try:
                        report = await evaluate_strategy(
                            strategy, problems, workers, pool.tokenizer, pool.config, budget_tokens=budget,
                            concurrency=concurrency,
                            on_problem=functools.partial(_count, progress))
                    finally:
                        progress.close()
                    if on_report:
                        on_report(report)
                    reports.append(report)
            return reports

        return asyncio.run(go())


def _count(progress, result) -> None:
    progress.update(ok=True, tokens=result.stats.generated_tokens)


def plot(reports: list[StrategyReport], path_prefix: str) -> list[str]:
    """Accuracy (with its 95% interval) against mean generated tokens, one line per strategy, plus each MCTS
    strategy's pass@tree as a dotted line; writes ``PREFIX.png`` and ``PREFIX.svg`` and returns their paths."""
    from deploy.plots import new_figure, save_figure

    figure, axes = new_figure(figsize=(7.5, 4.8))
    for name in dict.fromkeys(r.strategy for r in reports):
        rows = sorted((r for r in reports if r.strategy == name), key=lambda r: r.mean_tokens)
        x = [r.mean_tokens for r in rows]
        y = [100 * r.accuracy for r in rows]
        err = [[100 * (r.accuracy - r.ci_low) for r in rows], [100 * (r.ci_high - r.accuracy) for r in rows]]
        line = axes.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
        if rows[0].rule_accuracy is not None:
            axes.plot(x, [100 * r.pass_at_tree for r in rows], linestyle=":", color=line.lines[0].get_color(),
                      label=f"{name}: pass@tree (oracle)")
    axes.set_xlabel("mean generated tokens per problem")
    axes.set_ylabel("accuracy (%), 95% Wilson interval")
    axes.set_title(f"{reports[0].problems} problems, budgets {sorted({r.budget_tokens for r in reports})}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="best")
    return save_figure(figure, path_prefix)


def _rules(r: StrategyReport) -> str:
    if r.rule_accuracy is None:
        return "-"
    return " / ".join(f"{100 * r.rule_accuracy[rule.value]:.1f}" for rule in FinalChoice)


def format_table(reports: list[StrategyReport]) -> str:
    lines = [f"{'strategy':<18} {'budget':>6} {'accuracy':>8}  {'95% CI':<13} {'tokens':>7} {'wall s':>7} "
             f"{'AUROC':>6} {'lines':>6} {'pass@tree':>9}  rules ({' / '.join(rule.value for rule in FinalChoice)})"]
    for r in reports:
        lines.append(f"{r.strategy:<18} {r.budget_tokens:>6} {100 * r.accuracy:>7.1f}%  "
                     f"{100 * r.ci_low:>5.1f}-{100 * r.ci_high:<5.1f}% {r.mean_tokens:>7.1f} {r.wall_seconds:>7.1f} "
                     f"{_auc(r.auroc):>6} {_auc(r.line_auroc):>6} {100 * r.pass_at_tree:>8.1f}%  {_rules(r)}")
    return "\n".join(lines)


def format_markdown(reports: list[StrategyReport]) -> str:
    rules = " / ".join(rule.value for rule in FinalChoice)
    lines = [f"| strategy | budget | accuracy | 95% CI | mean generated tokens | wall time (s) | value AUROC | "
             f"line AUROC | pass@tree | accuracy by final rule ({rules}) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in reports:
        lines.append(f"| {r.strategy} | {r.budget_tokens} | {100 * r.accuracy:.1f}% ({r.correct}/{r.problems}) | "
                     f"{100 * r.ci_low:.1f}-{100 * r.ci_high:.1f}% | {r.mean_tokens:.1f} | {r.wall_seconds:.1f} | "
                     f"{_auc(r.auroc)} | {_auc(r.line_auroc)} | {100 * r.pass_at_tree:.1f}% | {_rules(r)} |")
    return "\n".join(lines)


def _auc(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def report_json(report: StrategyReport) -> str:
    return json.dumps(report.row())
