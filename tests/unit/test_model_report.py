"""`forest model-report`'s figures from decoded responses: greedy, one-sample and pass@k accuracy by length."""

import collections

import pytest

from deploy.model_report import by_step_kind, format_report, plot_report, report_title, summarize
from modelkit.arithmetic import (HELD_OUT_SEED_START, STEP_DELIMITER, THOUGHT_OPEN, Distribution, long_form,
                                 make_problems)
from search.prompts import REFLECTION_PHRASE


def _answer(text: str) -> str:
    return f"<Thought>\nx\n</Thought>\n<Output>\n{text}\n</Output>"


def test_summary_counts_greedy_samples_and_pass_at_k_by_length():
    problems = make_problems(40, seed=11)
    one = [p for p in problems if p.changes == 3][:2]  # the shortest problems of the default ranges
    two = [p for p in problems if p.changes == 4][:1]
    chosen = one + two
    greedy = [_answer(one[0].answer), None, _answer("-1")]
    sampled = [[_answer(one[0].answer), _answer("-1")],
               [_answer("-1"), REFLECTION_PHRASE + _answer(one[1].answer)],
               [_answer("-1"), _answer("-2")]]
    report = summarize(chosen, greedy, sampled, samples=2, temperature=0.3, top_p=1.0, max_tokens=256,
                       greedy_tokens=[10, 20, 30])
    assert report.overall.problems == 3 and report.mean_greedy_tokens == 20
    assert report.overall.greedy == pytest.approx(1 / 3)
    assert report.overall.one_sample == pytest.approx(2 / 6)
    assert report.overall.pass_at_k == pytest.approx(2 / 3)
    assert report.overall.reflecting == pytest.approx(1 / 6)
    by = {r.changes: r for r in report.by_length}
    assert set(by) == {3, 4}
    assert (by[3].greedy, by[3].one_sample, by[3].pass_at_k) == (0.5, 0.5, 1.0)
    assert (by[4].greedy, by[4].pass_at_k) == (0.0, 0.0)
    table = format_report(report)
    assert "pass@2" in table and table.splitlines()[len(report.by_length) + 2].split()[0] == "all"


def _written(steps) -> str:
    return THOUGHT_OPEN + STEP_DELIMITER.join(steps) + "\n</Thought>\n<Output>\n1\n</Output>"


def test_by_step_kind_counts_where_responses_first_go_wrong():
    """A response counts as reaching each step up to its first wrong one, and as wrong at that step's kind."""
    (problem,) = [p for p in make_problems(60, seed=5) if p.changes == 3][:1]
    steps, kinds = list(problem.steps), problem.kinds
    slipped = list(steps)
    slipped[2] = slipped[2].replace(" = ", " = 1", 1)  # the second change, written wrong ...
    slipped[2] = slipped[2].rstrip(".") + " 0."  # ... and with a wrong count
    greedy = [_written(steps)]  # every step as the solution writes it
    right_count = steps[:-1] + [f"So it is {problem.answer}."]  # a wrong conclusion that keeps the count
    sampled = [[_written(slipped), _written(steps[:1]), _written(right_count)]]
    rows = {r.kind: r for r in by_step_kind([problem], greedy, sampled)}
    assert set(rows) == set(kinds)
    assert all(r.greedy_reached == kinds.count(k) and r.greedy_wrong == 0 for k, r in rows.items())
    # the samples go wrong at the second change, the first change and the conclusion: they reach the kinds of
    # steps 0-2, 0-1 and all of them
    reached = collections.Counter(kinds[:3]) + collections.Counter(kinds[:2]) + collections.Counter(kinds)
    wrong = collections.Counter([kinds[2], kinds[1], kinds[-1]])
    assert {k: r.sampled_reached for k, r in rows.items()} == dict(reached)
    assert {k: r.sampled_wrong for k, r in rows.items() if r.sampled_wrong} == dict(wrong)
    assert {k: r.sampled_right_count for k, r in rows.items() if r.sampled_right_count} == {kinds[-1]: 1}
    assert all(r.greedy_right_count == 0 for r in rows.values())
    report = summarize([problem], greedy, sampled, samples=3, temperature=0.3, top_p=1.0, max_tokens=256,
                       greedy_tokens=[1])
    assert report.by_step_kind == list(rows.values())
    assert "the first wrong step, by kind" in format_report(report)


def test_the_figure_says_whose_weights_and_which_problems(tmp_path):
    """A report on development seeds must not be drawn as one on held-out problems."""
    assert report_title("m", 500, HELD_OUT_SEED_START) == "m on 500 held-out problems (seed 1,000,000)"
    assert report_title("m", 500, 500_000) == "m on 500 development problems (seed 500,000)"
    problems = make_problems(20, seed=3)
    report = summarize(problems, [None] * 20, [[_answer("-1")]] * 20, samples=1, temperature=0.3, top_p=1.0,
                       max_tokens=256, greedy_tokens=[1] * 20)
    png, svg = plot_report(report, str(tmp_path / "fig"), title=report_title("models/x", 20, 500_000))
    assert png.endswith(".png") and "development problems" in open(svg).read()


def test_model_report_cli_rejects_bad_counts_before_starting_anything(capsys):
    from deploy.cli import main

    assert main(["model-report", "--n", "0"]) == 2
    assert "--n and --samples must be >= 1" in capsys.readouterr().err
    assert main(["model-report", "--samples", "0"]) == 2
    capsys.readouterr()
    assert main(["model-report", "--distribution", "max_piles=1"]) == 2
    assert "forest model-report: --distribution: max_piles" in capsys.readouterr().err


def test_by_step_kind_counts_steps_written_the_long_way_and_their_mistakes():
    """A step in its long form is right; one in parts with a wrong part is wrong, and both count as long."""
    dist = Distribution(start=(100, 999), changes=(1, 3), max_count=9999, max_bags=49, max_bag_size=49, max_piles=25)
    problem = next(p for p in make_problems(300, seed=6, dist=dist)
                   if sum(long_form(s) is not None for s in p.steps) == 1)
    at = next(i for i, s in enumerate(problem.steps) if long_form(s))
    kind, long = problem.kinds[at], long_form(problem.steps[at])
    steps = list(problem.steps)
    careful = [*steps[:at], long, *steps[at + 1:]]
    slipped = [*steps[:at], long.replace(" = ", " = 1", 2), *steps[at + 1:]]  # a part written wrong
    rows = {r.kind: r for r in by_step_kind([problem], [_written(steps)],
                                            [[_written(careful), _written(slipped), _written(steps)]])}
    row = rows[kind]
    assert (row.greedy_long, row.greedy_long_wrong, row.greedy_wrong) == (0, 0, 0)
    assert (row.sampled_reached, row.sampled_long, row.sampled_long_wrong, row.sampled_wrong) == (
        2 * problem.kinds.count(kind) + problem.kinds[:at + 1].count(kind), 2, 1, 1)
    assert all(r.sampled_long == 0 for k, r in rows.items() if k != kind)
    report = summarize([problem], [_written(steps)], [[_written(careful), _written(slipped), _written(steps)]],
                       samples=3, temperature=0.3, top_p=1.0, max_tokens=256, greedy_tokens=[1])
    line = next(x for x in format_report(report).splitlines() if x.split()[:1] == [kind])
    assert line.split()[-2:] == [f"{100 * 2 / row.sampled_reached:.1f}%", "50.0%"]
