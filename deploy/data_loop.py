"""The data loop (``make data-loop``, docs/data-loop.md): is a Forest build worth its compute as training data?

Two builds over the same training problems with the same search settings and token cap per problem, one MCTS
(Forest's best preset) and one best-of-N sampling, give two fine-tuning sets: right finished lines of their trees
(what rejection sampling keeps; one per problem by default). The policy is fine-tuned on the lines of the first
quarter, half and all of the problems of each build, and every model's greedy accuracy is measured on held-out
problems. Written: one JSON line per model (``PREFIX.jsonl``, with which held-out problems it got right), the paired
differences between the models (``PREFIX-paired.jsonl``) and accuracy against the build's generated tokens
(``PREFIX.png``/``.svg``).

With ``--second-round``, each method also iterates (build -> train -> build, as rStar-Math does): the second half
of the problems is built again, with the same settings, by the model fine-tuned on the first half's lines, and the
base is fine-tuned on the first half's lines plus the new ones. That model has spent about the tokens of the
one-round model on all the problems, so the two answer whether a better policy finds better data.

``python -m deploy.data_loop --config C --problems P --build mcts=OUT --build best_of_n=OUT --heldout H --work DIR
--plot PREFIX [--second-round]``
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from cluster.config import DEFAULT_MODEL_DIR, ForestConfig, load_config

log = logging.getLogger(__name__)

FRACTIONS = (0.25, 0.5, 1.0)  # shares of the build's problems whose lines a model is fine-tuned on
# with a second round: the share of the problems whose lines teach the model that builds the rest again (one of
# FRACTIONS: that fraction's model builds)
FIRST_ROUND = 0.5
BASE = "base"


def greedy_accuracy(config: ForestConfig, model: str, problems) -> dict:
    """Greedy decoding of ``model`` on ``problems`` through ``forest eval`` (one fresh engine)."""
    from deploy.evaluate import run_eval

    (report,) = run_eval(eval_config(config, model), problems, ["greedy"],
                         budgets=[config.search.budget_tokens or config.search.max_path_tokens])
    return {"accuracy": report.accuracy, "ci_low": report.ci_low, "ci_high": report.ci_high,
            "correct": report.correct, "problems": report.problems, "right": list(report.right)}


def eval_config(config: ForestConfig, model: str) -> ForestConfig:
    """The loop's config for evaluating ``model``: engines of its own, and without the builds' ``stop_when_right``
    (an evaluation gives no strategy the reference to stop at)."""
    return config.model_copy(update={"engine": config.engine.model_copy(update={"model": model}),
                                     "search": config.search.model_copy(update={"stop_when_right": False}),
                                     "attach_workers": []})


def build_tokens(output: str, problem_ids: set[str]) -> int:
    """Tokens the build generated for ``problem_ids``."""
    from dataset.layout import TREES
    from dataset.reader import read_kind
    from dataset.schema import TREE_SCHEMA

    trees = read_kind(output, TREES, TREE_SCHEMA, columns=["problem_id", "tokens_generated"]).to_pylist()
    return sum(t["tokens_generated"] for t in trees if t["problem_id"] in problem_ids)


def second_round_build(config: ForestConfig, first: str, model: str, problems, work: Path) -> str:
    """Build ``problems`` again as the build ``first`` did (its strategy; ``config``'s search and engine settings),
    with ``model`` as the policy on engines of its own; returns the output directory (resumed if it exists)."""
    from dataset.reader import read_manifest
    from deploy.build import run_build

    name = Path(model).name
    work.mkdir(parents=True, exist_ok=True)
    inputs = work / f"{name}-round2.jsonl"
    inputs.write_text("".join(json.dumps({"id": p.problem_id, "question": p.question, "answer": p.answer}) + "\n"
                              for p in problems))
    output = str(work / f"{name}-round2-build")
    strategy = read_manifest(first)["config"]["build"]["strategy"]
    run_build(config.model_copy(update={
        "engine": config.engine.model_copy(update={"model": model}), "attach_workers": [],
        "build": config.build.model_copy(update={"input": str(inputs), "output": output, "strategy": strategy,
                                                 "limit": None})}))
    return output


def run(config: ForestConfig, problems, builds: dict[str, str], heldout, work: Path, *,
        base: str = DEFAULT_MODEL_DIR, seed: int = 0, second_round: bool = False) -> list[dict]:
    from transformers import AutoTokenizer

    from dataset.value_labels import read_value_examples
    from modelkit.arithmetic import held_out_problem
    from modelkit.policy import line_examples, train_policy

    lines_of = {method: read_value_examples([output]) for method, output in builds.items()}
    for method, lines in lines_of.items():
        held_out = sorted({line.problem_id for line in lines if held_out_problem(line.problem_id)})
        if held_out:
            raise ValueError(f"build {method}: {len(held_out)} problems come from held-out seeds (e.g. "
                             f"{held_out[0]}); the loop fine-tunes on training seeds only")
    tokenizer = AutoTokenizer.from_pretrained(base)
    problem_ids = [p.problem_id for p in problems]
    rows = [{"method": BASE, "fraction": 0.0, "rounds": 0, "build_tokens": 0, "lines": 0,
             **greedy_accuracy(config, base, heldout)}]
    log.info("base: %s", rows[-1])

    def fine_tune(method: str, fraction: float, rounds: int, lines, tokens: int, model: Path) -> None:
        examples = line_examples(lines, tokenizer, seed=seed, check=config.search.step_check)
        report = train_policy(examples, base=base, output=model, seed=seed)
        rows.append({"method": method, "fraction": fraction, "rounds": rounds, "build_tokens": tokens,
                     "lines": len(examples), "problems_with_lines": len({e.problem_id for e in examples}),
                     "dev_loss": report["dev_loss"], "base_dev_loss": report["base_dev_loss"],
                     "train_seconds": report["seconds"], **greedy_accuracy(config, str(model), heldout)})
        log.info("%s: %s", method, rows[-1])

    for method, output in builds.items():
        lines = lines_of[method]
        tuned = {}  # fraction -> (its problems, their build tokens, the model fine-tuned on their lines)
        for fraction in FRACTIONS:
            keep = set(problem_ids[:round(fraction * len(problem_ids))])
            tuned[fraction] = keep, build_tokens(output, keep), work / f"{method}-{fraction}"
            fine_tune(method, fraction, 1, [line for line in lines if line.problem_id in keep], *tuned[fraction][1:])
        if second_round:
            first, tokens, model = tuned[FIRST_ROUND]
            again = [p for p in problems if p.problem_id not in first]
            rebuilt = second_round_build(config, output, str(model), again, work)
            fine_tune(method, 1.0, 2, [line for line in lines if line.problem_id in first]
                      + read_value_examples([rebuilt]),
                      tokens + build_tokens(rebuilt, {p.problem_id for p in again}), work / f"{method}-round2")
    return rows


def paired(rows: list[dict]) -> list[dict]:
    """Paired differences on the held-out problems (``deploy.evaluate.paired_difference``): every fine-tuned model
    against the base, and each pair of methods at the same share of the problems and the same rounds."""
    from deploy.evaluate import paired_difference

    base = next(r for r in rows if r["method"] == BASE)
    tuned = [r for r in rows if r["method"] != BASE]
    pairs = [(r, base) for r in tuned]
    methods = list(dict.fromkeys(r["method"] for r in tuned))
    for i, method in enumerate(methods):
        for other in methods[i + 1:]:
            pairs += [(r, o) for r in tuned if r["method"] == method for o in tuned
                      if o["method"] == other and (o["fraction"], o["rounds"]) == (r["fraction"], r["rounds"])]
    return [{"first": _label(a), "second": _label(b), "first_tokens": a["build_tokens"],
             "second_tokens": b["build_tokens"], **paired_difference(a["right"], b["right"])} for a, b in pairs]


def _label(row: dict) -> str:
    if row["method"] == BASE:
        return BASE
    return f"{row['method']} {row['fraction']:.0%}" + (f", {row['rounds']} rounds" if row["rounds"] > 1 else "")


def plot(rows: list[dict], prefix: str) -> list[str]:
    """Held-out greedy accuracy (95% interval) against the build's generated tokens, one line per method."""
    from deploy.plots import new_figure, save_figure

    figure, axes = new_figure(figsize=(6.4, 4.2))
    base = next(r for r in rows if r["method"] == BASE)
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != BASE):
        one = sorted((r for r in rows if r["method"] == method and r["rounds"] == 1),
                     key=lambda r: r["build_tokens"])
        line = axes.errorbar(*_series([base, *one]), marker="o", capsize=3, label=f"fine-tuned on {method} lines")
        two = [r for r in rows if r["method"] == method and r["rounds"] == 2]
        if two:  # the iterated loop leaves the one-round line where its second round starts
            start = [r for r in one if r["fraction"] == FIRST_ROUND]
            axes.errorbar(*_series([*start, *two]), marker="s", capsize=3, linestyle="--",
                          color=line.lines[0].get_color(), label=f"{method}, second half built by the round-1 model")
    axes.axhline(100 * base["accuracy"], color="grey", linestyle=":", label="base model")
    axes.set_xlabel("generated tokens of the build (millions)")
    axes.set_ylabel("held-out greedy accuracy (%)")
    axes.legend()
    return save_figure(figure, prefix)


def _series(points: list[dict]) -> tuple:
    """x (millions of build tokens), y and the 95% interval's error bars (percent) of ``points``."""
    return ([r["build_tokens"] / 1e6 for r in points], [100 * r["accuracy"] for r in points],
            [[100 * (r["accuracy"] - r["ci_low"]) for r in points],
             [100 * (r["ci_high"] - r["accuracy"]) for r in points]])


def main(argv: list[str] | None = None) -> int:
    from dataset.problems import read_problems

    p = argparse.ArgumentParser(prog="python -m deploy.data_loop", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="the builds' config (its engine and budget run the evals)")
    p.add_argument("--problems", required=True, help="the builds' input: lines are added in its order")
    p.add_argument("--build", action="append", required=True, metavar="METHOD=OUT", help="a build output")
    p.add_argument("--heldout", required=True, help="held-out problems for the greedy evaluations")
    p.add_argument("--work", required=True, help="folder for the fine-tuned models")
    p.add_argument("--plot", required=True, metavar="PREFIX",
                   help="writes PREFIX.jsonl, PREFIX-paired.jsonl, PREFIX.png, PREFIX.svg")
    p.add_argument("--base", default=DEFAULT_MODEL_DIR)
    p.add_argument("--second-round", action="store_true",
                   help="also build the second half of the problems again with the model of the first half's lines")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    builds = dict(b.split("=", 1) for b in args.build)
    problems, _ = read_problems(args.problems)
    heldout, _ = read_problems(args.heldout)
    rows = run(load_config(args.config), problems, builds, heldout, Path(args.work), base=args.base,
               second_round=args.second_round)
    with open(f"{args.plot}.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    differences = paired(rows)
    with open(f"{args.plot}-paired.jsonl", "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in differences)
    for d in differences:
        print(f"{d['first']} - {d['second']}: {100 * d['difference']:+.1f} points (95% paired interval "
              f"{100 * d['ci_low']:+.1f} to {100 * d['ci_high']:+.1f}; McNemar p {d['mcnemar_p']:.2g})")
    print("\n".join(plot(rows, args.plot)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
