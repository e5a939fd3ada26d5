"""The data loop (``make data-loop``, docs/data-loop.md): is a Forest build worth its compute as training data?

Two builds over the same training problems at the same generated-token budget per problem, one MCTS (Forest's
best preset) and one best-of-N sampling, give two fine-tuning sets: every distinct right finished line of their
trees (what rejection sampling keeps). The policy is fine-tuned on the lines of the first quarter, half and all of
the problems of each build, and every model's greedy accuracy is measured on held-out problems. Written: one JSON
line per model (``PREFIX.jsonl``) and accuracy against the build's generated tokens (``PREFIX.png``/``.svg``).

``python -m deploy.data_loop --config C --problems P --build mcts=OUT --build best_of_n=OUT --heldout H --work DIR
--plot PREFIX``
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
BASE = "base"


def greedy_accuracy(config: ForestConfig, model: str, problems) -> dict:
    """Greedy decoding of ``model`` on ``problems`` through ``forest eval`` (one fresh engine)."""
    from deploy.evaluate import run_eval

    engine = config.engine.model_copy(update={"model": model})
    (report,) = run_eval(config.model_copy(update={"engine": engine, "attach_workers": []}), problems, ["greedy"],
                         budgets=[config.search.budget_tokens or config.search.max_path_tokens])
    return {"accuracy": report.accuracy, "ci_low": report.ci_low, "ci_high": report.ci_high,
            "correct": report.correct, "problems": report.problems}


def build_tokens(output: str, problem_ids: set[str]) -> int:
    """Tokens the build generated for ``problem_ids``."""
    from dataset.layout import TREES
    from dataset.reader import read_kind
    from dataset.schema import TREE_SCHEMA

    trees = read_kind(output, TREES, TREE_SCHEMA, columns=["problem_id", "tokens_generated"]).to_pylist()
    return sum(t["tokens_generated"] for t in trees if t["problem_id"] in problem_ids)


def run(config: ForestConfig, problem_ids: list[str], builds: dict[str, str], heldout, work: Path, *,
        base: str = DEFAULT_MODEL_DIR, seed: int = 0) -> list[dict]:
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
    rows = [{"method": BASE, "fraction": 0.0, "build_tokens": 0, "lines": 0, **greedy_accuracy(config, base, heldout)}]
    log.info("base: %s", rows[-1])
    for method, output in builds.items():
        lines = lines_of[method]
        for fraction in FRACTIONS:
            keep = set(problem_ids[:round(fraction * len(problem_ids))])
            examples = line_examples([line for line in lines if line.problem_id in keep], tokenizer)
            model = work / f"{method}-{fraction}"
            report = train_policy(examples, base=base, output=model, seed=seed)
            rows.append({"method": method, "fraction": fraction, "build_tokens": build_tokens(output, keep),
                         "lines": len(examples), "problems_with_lines": len({e.problem_id for e in examples}),
                         "dev_loss": report["dev_loss"], "base_dev_loss": report["base_dev_loss"],
                         "train_seconds": report["seconds"], **greedy_accuracy(config, str(model), heldout)})
            log.info("%s: %s", method, rows[-1])
    return rows


def plot(rows: list[dict], prefix: str) -> list[str]:
    """Held-out greedy accuracy (95% interval) against the build's generated tokens, one line per method."""
    from deploy.plots import new_figure, save_figure

    figure, axes = new_figure(figsize=(6.4, 4.2))
    base = next(r for r in rows if r["method"] == BASE)
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != BASE):
        points = [base] + sorted((r for r in rows if r["method"] == method), key=lambda r: r["build_tokens"])
        x = [r["build_tokens"] / 1e6 for r in points]
        y = [100 * r["accuracy"] for r in points]
        errors = [[100 * (r["accuracy"] - r["ci_low"]) for r in points],
                  [100 * (r["ci_high"] - r["accuracy"]) for r in points]]
        axes.errorbar(x, y, yerr=errors, marker="o", capsize=3, label=f"fine-tuned on {method} lines")
    axes.axhline(100 * base["accuracy"], color="grey", linestyle=":", label="base model")
    axes.set_xlabel("generated tokens of the build (millions)")
    axes.set_ylabel("held-out greedy accuracy (%)")
    axes.legend()
    return save_figure(figure, prefix)


def main(argv: list[str] | None = None) -> int:
    from dataset.problems import read_problems

    p = argparse.ArgumentParser(prog="python -m deploy.data_loop", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="the builds' config (its engine and budget run the evals)")
    p.add_argument("--problems", required=True, help="the builds' input: lines are added in its order")
    p.add_argument("--build", action="append", required=True, metavar="METHOD=OUT", help="a build output")
    p.add_argument("--heldout", required=True, help="held-out problems for the greedy evaluations")
    p.add_argument("--work", required=True, help="folder for the fine-tuned models")
    p.add_argument("--plot", required=True, metavar="PREFIX", help="writes PREFIX.jsonl, PREFIX.png, PREFIX.svg")
    p.add_argument("--base", default=DEFAULT_MODEL_DIR)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    builds = dict(b.split("=", 1) for b in args.build)
    problems, _ = read_problems(args.problems)
    heldout, _ = read_problems(args.heldout)
    rows = run(load_config(args.config), [q.problem_id for q in problems], builds, heldout, Path(args.work),
               base=args.base)
    with open(f"{args.plot}.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print("\n".join(plot(rows, args.plot)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
