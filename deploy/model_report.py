"""``forest model-report``: how the policy model behaves on its own problems, before any search.

For each problem of ``forest make-problems --n N --seed S`` (generated here, so each one's number of worked steps is
known): one greedy response and ``--samples`` responses at the configured sampling temperature and top-p, each up to
``search.max_path_tokens`` tokens. Reported, overall and by number of steps: greedy accuracy, the accuracy of one
sample (the mean over the samples, an unbiased estimate), pass@k (some sample is right), and how often a response
reflects on its own (writes the reflection phrase unprompted). These say whether a search has something to find:
pass@k far above greedy, and sampling not much worse than greedy. By kind of worked step (a gain, a split, ...):
how many greedy and sampled responses reach a step of that kind with every earlier step right, and what share of
those write it wrong (and of those, how many still leave the right count, as a split with a wrong remainder does);
this says which steps the model fails at, so which ranges make a distribution hard. For the kinds that have a long
form (a product or a division worked in parts), also how many of the steps reached are written the long way and
how many of those are wrong: whether sampling finds the careful way, and whether it pays.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
from dataclasses import dataclass

import numpy as np

from cluster.config import ForestConfig
from modelkit.arithmetic import (STEP_KINDS, ArithmeticProblem, first_wrong_step, held_out_seed, step_count,
                                 written_long, written_steps)
from search.prompts import OUTPUT_END, REFLECTION_PHRASE, answers_match, extract_answer, prompt_token_ids
from search.protocol import GenerationRequest

DEFAULT_SAMPLES = 8


@dataclass(frozen=True, slots=True)
class LengthRow:
    """Figures for the problems with one number of worked steps (``changes`` 0 stands for all problems)."""

    changes: int
    problems: int
    greedy: float
    one_sample: float
    pass_at_k: float
    reflecting: float  # share of sampled responses that write the reflection phrase

    def row(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class StepKindRow:
    """Responses that reach a worked step of ``kind`` with every earlier step right, how many of those write it
    wrong, and how many of the wrong ones still leave the right count (greedy responses, then sampled ones); and
    how many of the steps reached are written the long way, and how many of those are wrong."""

    kind: str
    greedy_reached: int
    greedy_wrong: int
    greedy_right_count: int
    sampled_reached: int
    sampled_wrong: int
    sampled_right_count: int
    greedy_long: int = 0
    greedy_long_wrong: int = 0
    sampled_long: int = 0
    sampled_long_wrong: int = 0


@dataclass(frozen=True, slots=True)
class ModelReport:
    samples: int
    temperature: float
    top_p: float
    max_tokens: int
    mean_greedy_tokens: float
    overall: LengthRow
    by_length: list[LengthRow]
    by_step_kind: list[StepKindRow]

    def row(self) -> dict:
        return dataclasses.asdict(self)


def _summary(changes: int, greedy: list[bool], sampled: list[list[bool]], reflecting: list[list[bool]]) -> LengthRow:
    return LengthRow(changes, len(greedy), float(np.mean(greedy)), float(np.mean(sampled)),
                     float(np.mean([any(s) for s in sampled])), float(np.mean(reflecting)))


def _first_wrong_counts(problems: list[ArithmeticProblem], responses: list[list[str]]
                        ) -> dict[str, collections.Counter]:
    """By step kind over every response of every problem: the steps reached, the wrong ones, the wrong ones that
    leave the right count, the reached ones written the long way and the long ones that are wrong."""
    counts = {name: collections.Counter() for name in ("reached", "wrong", "right_count", "long", "long_wrong")}
    for problem, texts in zip(problems, responses, strict=True):
        for text in texts:
            first = first_wrong_step(problem, text)
            reached = len(problem.steps) if first is None else first[0] + 1
            counts["reached"].update(problem.kinds[:reached])
            counts["long"].update(kind for kind, step in zip(problem.kinds[:reached], written_steps(text),
                                                             strict=False) if written_long(step))
            if first is not None:
                index, written = first
                kind = problem.kinds[index]
                counts["wrong"][kind] += 1
                counts["right_count"][kind] += step_count(written) == step_count(problem.steps[index])
                counts["long_wrong"][kind] += written_long(written)
    return counts


def by_step_kind(problems: list[ArithmeticProblem], greedy: list[str | None], sampled: list[list[str]]
                 ) -> list[StepKindRow]:
    """Where responses first go wrong, by kind of worked step (the kinds some problem has, in a fixed order)."""
    g = _first_wrong_counts(problems, [[text or ""] for text in greedy])
    s = _first_wrong_counts(problems, sampled)
    return [StepKindRow(kind, g["reached"][kind], g["wrong"][kind], g["right_count"][kind], s["reached"][kind],
                        s["wrong"][kind], s["right_count"][kind], g["long"][kind], g["long_wrong"][kind],
                        s["long"][kind], s["long_wrong"][kind])
            for kind in STEP_KINDS if any(kind in p.kinds for p in problems)]


def summarize(problems: list[ArithmeticProblem], greedy: list[str | None], sampled: list[list[str]], *,
              samples: int, temperature: float, top_p: float, max_tokens: int, greedy_tokens: list[int]
              ) -> ModelReport:
    """The report from the decoded responses (``sampled[i]``: problem ``i``'s ``samples`` responses)."""
    greedy_right = [answers_match(extract_answer(text or ""), p.answer) for text, p in zip(greedy, problems,
                                                                                          strict=True)]
    sample_right = [[answers_match(extract_answer(t), p.answer) for t in texts]
                    for texts, p in zip(sampled, problems, strict=True)]
    reflecting = [[REFLECTION_PHRASE in t for t in texts] for texts in sampled]
    groups = collections.defaultdict(list)
    for i, p in enumerate(problems):
        groups[p.changes].append(i)
    by_length = [_summary(changes, [greedy_right[i] for i in idx], [sample_right[i] for i in idx],
                          [reflecting[i] for i in idx]) for changes, idx in sorted(groups.items())]
    return ModelReport(samples, temperature, top_p, max_tokens, float(np.mean(greedy_tokens)),
                       _summary(0, greedy_right, sample_right, reflecting), by_length,
                       by_step_kind(problems, greedy, sampled))


def run_model_report(config: ForestConfig, problems: list[ArithmeticProblem], *, samples: int = DEFAULT_SAMPLES,
                     concurrency: int = 64) -> ModelReport:
    """Decode every problem greedily and ``samples`` times on the config's workers; see the module doc."""
    from actors.pool import TreeEngine, open_pool
    from deploy.progress import Progress

    search = config.search
    with open_pool(config, value=False) as pool:
        tokenizer = pool.tokenizer

        async def go():
            workers = pool.worker_pool()
            gate = asyncio.Semaphore(concurrency)
            progress = Progress(len(problems), label="model report", unit="problem")

            async def one(index: int, problem: ArithmeticProblem):
                prompt = np.asarray(prompt_token_ids(tokenizer, problem.question, system_prompt=search.system_prompt),
                                    dtype=np.int32)
                base = GenerationRequest(prompt, max_tokens=search.max_path_tokens, stop=(OUTPUT_END,))
                async with gate:
                    engine = TreeEngine(workers)
                    try:
                        (greedy,) = await engine.generate(dataclasses.replace(base, temperature=0.0,
                                                                              request_id=f"report-{index}-greedy"))
                        drawn = await engine.generate(dataclasses.replace(
                            base, n=samples, temperature=search.temperature, top_p=search.top_p, seed=index,
                            request_id=f"report-{index}-samples"))
                    finally:
                        engine.close()
                progress.update(ok=True, tokens=len(greedy) + sum(len(c) for c in drawn))
                return greedy, drawn

            try:
                return await asyncio.gather(*(one(i, p) for i, p in enumerate(problems)))
            finally:
                progress.close()

        results = asyncio.run(go())
        decode = tokenizer.decode
        greedy = [decode(g.token_ids.tolist()) for g, _ in results]
        sampled = [[decode(c.token_ids.tolist()) for c in drawn] for _, drawn in results]
    return summarize(problems, greedy, sampled, samples=samples, temperature=search.temperature, top_p=search.top_p,
                     max_tokens=search.max_path_tokens, greedy_tokens=[len(g) for g, _ in results])


def format_report(report: ModelReport) -> str:
    k = report.samples
    lines = [f"{report.overall.problems} problems; samples at temperature {report.temperature:g}, top-p "
             f"{report.top_p:g}, up to {report.max_tokens} tokens; greedy used {report.mean_greedy_tokens:.1f} "
             "tokens on average",
             f"{'steps':>5} {'problems':>8} {'greedy':>7} {'1 sample':>8} {f'pass@{k}':>7} {'reflects':>8}"]
    for r in [*report.by_length, report.overall]:
        label = "all" if r.changes == 0 else str(r.changes)
        lines.append(f"{label:>5} {r.problems:>8} {100 * r.greedy:>6.1f}% {100 * r.one_sample:>7.1f}% "
                     f"{100 * r.pass_at_k:>6.1f}% {100 * r.reflecting:>7.1f}%")
    lines += ["", "the first wrong step, by kind: responses that reach a step of the kind with every earlier step "
              "right, the share of those that write it wrong, and the share of the wrong ones that still leave the "
              "right count; then the share of the steps reached written the long way, and the share of those that "
              "are wrong",
              f"{'kind':>10} {'greedy':>7} {'wrong':>6} {'count ok':>8} {'sampled':>8} {'wrong':>6} {'count ok':>8} "
              f"{'greedy long':>11} {'wrong':>6} {'sampled long':>12} {'wrong':>6}"]
    for r in report.by_step_kind:
        lines.append(f"{r.kind:>10} {r.greedy_reached:>7} {_share(r.greedy_wrong, r.greedy_reached):>6} "
                     f"{_share(r.greedy_right_count, r.greedy_wrong):>8} {r.sampled_reached:>8} "
                     f"{_share(r.sampled_wrong, r.sampled_reached):>6} "
                     f"{_share(r.sampled_right_count, r.sampled_wrong):>8} "
                     f"{_share(r.greedy_long, r.greedy_reached):>11} {_share(r.greedy_long_wrong, r.greedy_long):>6} "
                     f"{_share(r.sampled_long, r.sampled_reached):>12} "
                     f"{_share(r.sampled_long_wrong, r.sampled_long):>6}")
    return "\n".join(lines)


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


TITLE_FONT_SIZE = 10  # the title names a model path, often longer than the default size fits in 6 inches


def report_title(model: str, problems: int, seed: int) -> str:
    """The figure's title: which weights, and whether the problems' stream is held-out or development."""
    kind = "held-out" if held_out_seed(seed) else "development"
    return f"{model} on {problems} {kind} problems (seed {seed:,})"


def plot_report(report: ModelReport, path_prefix: str, *, title: str) -> list[str]:
    """Greedy, one-sample and pass@k accuracy against the number of worked steps: ``PREFIX.png`` and ``.svg``."""
    from deploy.plots import new_figure, save_figure

    steps = [r.changes for r in report.by_length]
    figure, axes = new_figure(figsize=(6, 4))
    for label, values in (("greedy", [r.greedy for r in report.by_length]),
                          (f"one sample (temperature {report.temperature:g})",
                           [r.one_sample for r in report.by_length]),
                          (f"pass@{report.samples}", [r.pass_at_k for r in report.by_length])):
        axes.plot(steps, [100 * v for v in values], marker="o", label=label)
    axes.set(xlabel="worked steps in the problem", ylabel="accuracy (%)", ylim=(0, 100), xticks=steps)
    axes.set_title(title, fontsize=TITLE_FONT_SIZE)
    axes.grid(alpha=0.3)
    axes.legend()
    return save_figure(figure, path_prefix)


def report_json(report: ModelReport) -> str:
    return json.dumps(report.row())
