"""The ``forest`` command line: each subcommand only wires parts together."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.benchmarks import (BENCHES, DEFAULT_BENCH_PROBLEMS, ENGINE_BENCH_TREES_PER_ACTIVE, TRAIN_BENCH_BATCH,
                              TRAIN_BENCH_MICRO_BATCHES, TRAIN_BENCH_STEPS)
from cluster.config import DEFAULT_MODEL_DIR
from deploy.flags import DEFAULT_CONFIG, EXIT_USAGE, add_build_flags, add_run_flags, load, run
from deploy.model_report import DEFAULT_SAMPLES
from deploy.viewer import DEFAULT_VIEW_FOLDER
from modelkit import policy as policy_recipe
from modelkit import value as value_recipe
from modelkit import verifier as verifier_recipe
from modelkit.arithmetic import HELD_OUT_SEED_START
from search.params import StepCheck
from search.strategies import EVAL_STRATEGIES, STRATEGIES, needs_value_model


def _lines_per_problem(value: str) -> int | None:
    """``--lines-per-problem``: a count of at least 1, or ``all``."""
    if value == "all":
        return None
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: a whole number of at least 1, or 'all'")
    return int(value)


def _add_training_flags(p: argparse.ArgumentParser, recipe) -> None:
    """The fine-tuning flags of train-policy and train-value, defaulting to ``recipe``'s constants."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=recipe.EPOCHS)
    p.add_argument("--batch-size", type=int, default=recipe.BATCH_SIZE)
    p.add_argument("--lr", type=float, default=recipe.LEARNING_RATE)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="forest", description="Marco-o1-style tree search over LLM reasoning on Ray.")
    sub = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mm = sub.add_parser("make-model", help="write a small model that vLLM's CPU build can load")
    mm.add_argument("--tiny-random", metavar="DIR", required=True,
                    help="write a random-weight Qwen2 model with a locally trained tokenizer to DIR")
    mm.add_argument("--seed", type=int, default=0)

    mp = sub.add_parser("make-problems", help="write arithmetic word problems (the bundled model's distribution)")
    mp.add_argument("--n", type=int, required=True, help="how many problems")
    mp.add_argument("--seed", type=int, required=True,
                    help="stream seed; held-out sets use seeds >= 1000000, which training never uses")
    mp.add_argument("--output", required=True, metavar="FILE", help="JSONL file of id, question, answer")
    add_distribution_flag(mp)

    tp = sub.add_parser("train-policy", help="fine-tune the policy on the right lines a build found (supervised), "
                                             "then optionally a DPO pass on its preference pairs")
    data = tp.add_mutually_exclusive_group()
    data.add_argument("--sft", metavar="FILE", help="a build's sft.jsonl (the chosen line of each right tree)")
    data.add_argument("--input", nargs="+", metavar="OUT", help="build outputs: every distinct finished line whose "
                                                               "answer is right (training seeds only)")
    preference = tp.add_mutually_exclusive_group()
    preference.add_argument("--pairs", metavar="FILE", help="a build's pairs.parquet: a DPO pass after the supervised "
                                                           "one (or from --base alone), the starting model as its "
                                                           "reference")
    preference.add_argument("--outcome-pairs", action="store_true",
                            help="with --input: a DPO pass after the supervised one on pairs judged by the answers: "
                                 "each wrong finished line against the right line of its problem that shares the "
                                 "longest prefix, cut where they part")
    tp.add_argument("--skip-solved", action="store_true",
                    help="with --input: leave out the problems whose finished lines are all right (the model "
                         "already solves them)")
    # no default here, so that a count given with --sft can be refused; line_examples holds the default
    tp.add_argument("--lines-per-problem", type=_lines_per_problem, default=argparse.SUPPRESS,
                    metavar="N|all", help="with --input: at most N distinct right lines of a problem, a seeded draw "
                                          f"(default {policy_recipe.LINES_PER_PROBLEM}; all: every one)")
    tp.add_argument("--step-check", choices=[c.value for c in StepCheck], default=argparse.SUPPRESS,
                    help="with --input: leave out the right lines that fail this check of their steps (arithmetic: "
                         "a line that writes a false 'a op b = c'; default off)")
    tp.add_argument("--keep", choices=policy_recipe.KEEPS, default=policy_recipe.KEEP,
                    help="the weights the supervised pass keeps: those with the best dev loss, with an early stop, "
                         "or those after its last epoch (the DPO pass keeps its best)")
    # the DPO pass's settings have no argparse default either, so that one given without a DPO pass is refused
    tp.add_argument("--beta", type=float, default=argparse.SUPPRESS,
                    help=f"DPO's beta (default {policy_recipe.DPO_BETA})")
    tp.add_argument("--sft-weight", type=float, default=argparse.SUPPRESS,
                    help="weight of a supervised term on the chosen continuations beside the DPO loss (RPO; "
                         f"default {policy_recipe.DPO_SFT_WEIGHT}: plain DPO)")
    tp.add_argument("--output", required=True, metavar="DIR", help="model directory to write")
    tp.add_argument("--base", default=DEFAULT_MODEL_DIR, help="the policy to fine-tune")
    _add_training_flags(tp, policy_recipe)

    tv = sub.add_parser("train-value", help="train a value model (a process reward model) on the trees of builds")
    tv.add_argument("--input", nargs="+", required=True, metavar="OUT",
                    help="build outputs whose problems had reference answers (training seeds only)")
    tv.add_argument("--output", required=True, metavar="DIR", help="value model directory to write")
    tv.add_argument("--base", default=DEFAULT_MODEL_DIR, help="policy whose weights start the value model")
    tv.add_argument("--pairwise-weight", type=float, default=value_recipe.PAIRWISE_WEIGHT,
                    help="weight of a ranking loss over each problem's (right, wrong) line pairs, added to the "
                         "step labels' loss (0: the labels alone)")
    tv.add_argument("--step-check", choices=[c.value for c in StepCheck], default=StepCheck.OFF.value,
                    help="a line counts as right in the step labels only when it passes this check, so a step "
                         "that fails it is labelled wrong (docs/value.md)")
    _add_training_flags(tv, value_recipe)

    tw = sub.add_parser("train-verifier", help="train a verifier: the policy fine-tuned on the results its "
                                               "solutions' equations claim, served as a value by likelihood")
    tw.add_argument("--input", nargs="+", metavar="OUT", help="learn from the right finished lines of these build "
                    "outputs (training seeds only) instead of the problem generator's solutions")
    tw.add_argument("--output", required=True, metavar="DIR", help="verifier model directory to write")
    tw.add_argument("--base", default=DEFAULT_MODEL_DIR, help="the causal LM to fine-tune (the policy)")
    tw.add_argument("--steps", type=int, default=verifier_recipe.STEPS, help="training steps (batches): fresh "
                    "problems of training seeds at each, or the build's right lines over and over")
    tw.add_argument("--seed", type=int, default=0)
    tw.add_argument("--batch-size", type=int, default=verifier_recipe.BATCH_SIZE)
    tw.add_argument("--lr", type=float, default=verifier_recipe.LEARNING_RATE)
    tw.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    tw.add_argument("--device", default="cpu", help="cpu or cuda")

    build = sub.add_parser("build", help="build a dataset of search trees from a problems file (resumable)")
    add_build_flags(build)

    search = sub.add_parser("search", help="search one question and print the answer and the chosen path")
    add_run_flags(search)
    search.add_argument("question", help="the question to reason about")
    search.add_argument("--strategy", default="mcts", choices=list(STRATEGIES),
                        help="how to answer (search.strategies; default: MCTS as configured)")
    search.add_argument("--json", action="store_true", help="print the result as JSON")
    srv = sub.add_parser("serve", help="run the OpenAI-compatible reasoning endpoint until Ctrl-C")
    add_run_flags(srv)
    srv.add_argument("--host", help="bind address (serve.host, default 127.0.0.1)")
    srv.add_argument("--port", type=int, help="HTTP port (serve.port, default 8000)")
    ev = sub.add_parser("eval", help="compare search strategies' accuracy on problems with answers, at one budget")
    add_run_flags(ev)
    ev.add_argument("--input", required=True, help="problems with answers: JSONL or Parquet")
    ev.add_argument("--strategies", default=",".join(EVAL_STRATEGIES),
                    help=f"comma-separated, from {', '.join(STRATEGIES)}")
    ev.add_argument("--budgets", help="comma-separated token budgets (e.g. 512,1024,2048): every strategy runs at "
                                      "each, and a plot of accuracy against tokens is written")
    ev.add_argument("--plot", default="eval-accuracy", metavar="PREFIX",
                    help="with --budgets: write the plot to PREFIX.png and PREFIX.svg (default eval-accuracy)")
    ev.add_argument("--limit", type=int, help="evaluate only the first N problems")
    ev.add_argument("--concurrency", type=int, default=64, help="problems searched at once")
    ev.add_argument("--json", action="store_true", help="print one JSON line per strategy instead of a table")
    ev.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    mr = sub.add_parser("model-report", help="the policy model alone on generated problems: greedy, one sample "
                                             "and pass@k accuracy by number of steps")
    add_run_flags(mr)
    mr.add_argument("--n", type=int, default=500, help="how many problems (forest make-problems --n)")
    mr.add_argument("--seed", type=int, default=HELD_OUT_SEED_START,
                    help="problem stream seed (default: the first held-out seed)")
    mr.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="samples per problem (the k of pass@k)")
    add_distribution_flag(mr)
    mr.add_argument("--plot", metavar="PREFIX", help="also draw accuracy by steps to PREFIX.png and PREFIX.svg")
    mr.add_argument("--json", action="store_true", help="print the report as one JSON line")
    tc = sub.add_parser("training-curves", help="draw several modelkit.train runs' dev loss and dev greedy accuracy "
                                                "against steps on shared axes")
    tc.add_argument("runs", nargs="+", metavar="LABEL=PATH",
                    help="a label and a run's model directory (or its training.json)")
    tc.add_argument("--plot", required=True, metavar="PREFIX", help="write PREFIX.png and PREFIX.svg")
    bench = sub.add_parser("bench", help="performance benchmarks, printed as ratios measured in one run")
    bench.add_argument("bench", choices=BENCHES, help="which benchmark (see docs/benchmarks.md)")
    bench.add_argument("--config", default=DEFAULT_CONFIG,
                       help="engine and search settings (the real-engine benches)")
    bench.add_argument("--model", help="model directory (engine.model)")
    bench.add_argument("--problems", type=int,
                       help="trees searched by engine, designs, cache and value (default: engine "
                            f"{ENGINE_BENCH_TREES_PER_ACTIVE} x build.max_active_trees, the others "
                            f"{DEFAULT_BENCH_PROBLEMS})")
    bench.add_argument("--per-token-problems", type=int, default=4,
                       help="designs: trees the (slow) one-call-per-token loop searches")
    bench.add_argument("--repeats", type=int, default=1,
                       help="engine: rounds of Forest then plain vLLM; the figure is the median round's ratio")
    bench.add_argument("--block-sizes", default="32,128", help="cache: KV block sizes to compare")
    bench.add_argument("--trees", type=int, default=400, help="manager: trees per manager")
    bench.add_argument("--active", type=int, default=1000, help="manager/memory: trees active at once")
    bench.add_argument("--granularity", default="mini_step:64", help="manager/memory: action granularity")
    bench.add_argument("--managers", default="1,2,4", help="manager: manager counts to run")
    bench.add_argument("--steps", type=int, default=TRAIN_BENCH_STEPS, help="train: timed steps per setting")
    bench.add_argument("--batch-size", type=int, default=TRAIN_BENCH_BATCH, help="train: problems per step")
    bench.add_argument("--micro-batches", type=int, default=TRAIN_BENCH_MICRO_BATCHES,
                       help="train: pieces of each batch in the micro-batch settings")
    bench.add_argument("--device", default="cpu", help="train: cpu or cuda")
    add_distribution_flag(bench)
    bench.add_argument("--json", action="store_true", help="one JSON line per figure")
    view = sub.add_parser("view", help="write self-contained HTML pages of a build: an index of every tree and "
                                       "one page per tree (or, with --tree, one tree's page)")
    view.add_argument("output", metavar="OUT", help="a build's output directory or URI")
    view.add_argument("--tree", metavar="ID", help="only this tree_id's page")
    view.add_argument("--html", metavar="PATH", help="with --tree: the page's file (default tree-ID.html); "
                                                     "otherwise the folder of index.html and the tree pages "
                                                     f"(default {DEFAULT_VIEW_FOLDER})")
    return root


def cmd_make_model(args) -> int:
    from modelkit.make_model import make_tiny_random
    print(make_tiny_random(args.tiny_random, seed=args.seed))
    return 0


def add_distribution_flag(parser) -> None:
    parser.add_argument("--distribution", nargs="+", default=[], metavar="KEY=VALUE",
                        help="other ranges than the bundled model's, e.g. max_bags=49 max_piles=25 start=10-999 "
                             "(docs/model.md lists the keys)")


def parse_distribution(args, command: str):
    """The problem ranges of ``--distribution``, or None after printing what is wrong with them."""
    from modelkit.arithmetic import Distribution

    try:
        return Distribution.parse(args.distribution)
    except ValueError as e:
        print(f"forest {command}: --distribution: {e}", file=sys.stderr)
        return None


def cmd_make_problems(args) -> int:
    from modelkit.arithmetic import write_problems
    if args.n < 1:
        print(f"forest make-problems: --n must be >= 1, got {args.n}", file=sys.stderr)
        return EXIT_USAGE
    dist = parse_distribution(args, "make-problems")
    if dist is None:
        return EXIT_USAGE
    print(write_problems(args.output, args.n, args.seed, dist))
    return 0


def _build_lines(command: str, outputs: list[str], check: StepCheck = StepCheck.OFF):
    """The finished lines of build ``outputs`` for a model trained on them (``dataset.value_labels``); None, with
    the reason printed, when they cannot give labels or hold a problem of a held-out seed."""
    from dataset.value_labels import ValueDataError, read_value_examples
    from modelkit.arithmetic import held_out_problem

    try:
        examples = read_value_examples(outputs, check=check)
    except ValueDataError as exc:
        print(f"forest {command}: {exc}", file=sys.stderr)
        return None
    held_out = sorted({e.problem_id for e in examples if held_out_problem(e.problem_id)})
    if held_out:
        print(f"forest {command}: {len(held_out)} problems come from held-out seeds (e.g. {held_out[0]}); a model is "
              f"trained on training seeds only", file=sys.stderr)
        return None
    print(f"{len(examples)} finished lines of {len({e.problem_id for e in examples})} problems, "
          f"{sum(e.correct for e in examples)} right", flush=True)
    return examples


def cmd_train_value(args) -> int:
    from modelkit.value import train_value

    examples = _build_lines("train-value", args.input, StepCheck(args.step_check))
    if examples is None:
        return EXIT_USAGE
    try:
        report = train_value(examples, base=args.base, output=args.output, seed=args.seed, epochs=args.epochs,
                             batch_size=args.batch_size, lr=args.lr, pairwise_weight=args.pairwise_weight,
                             threads=args.threads, device=args.device, step_check=StepCheck(args.step_check))
    except (ValueError, FileNotFoundError) as exc:
        print(f"forest train-value: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps({k: report[k] for k in ("kept_step", "dev_loss", "line_auroc", "step_auroc", "tree_pick",
                                             "dev_tree_pick_bounds", "train_lines", "dev_lines", "seconds")}))
    return 0


def cmd_train_verifier(args) -> int:
    import logging

    from modelkit.verifier import train_verifier

    examples = None
    if args.input:
        examples = _build_lines("train-verifier", args.input)
        if examples is None:
            return EXIT_USAGE
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        report = train_verifier(base=args.base, output=args.output, examples=examples, seed=args.seed, steps=args.steps,
                                batch_size=args.batch_size, lr=args.lr, threads=args.threads, device=args.device)
    except (ValueError, FileNotFoundError) as exc:
        print(f"forest train-verifier: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps({k: report.get(k) for k in ("start", "kept_step", "dev_loss", "claim_accuracy", "seconds")}))
    return 0


def cmd_train_policy(args) -> int:
    from transformers import AutoTokenizer

    from dataset.exports import PairsDataError, SftDataError, read_pairs, read_sft
    from dataset.value_labels import ValueDataError, read_value_examples
    from modelkit.arithmetic import held_out_problem
    from modelkit.policy import (PolicyDataError, line_examples, outcome_pairs, pair_examples, sft_examples,
                                 train_dpo, train_policy)

    def training_seeds_only(problem_ids) -> None:
        held_out = sorted({p for p in problem_ids if held_out_problem(p)})
        if held_out:
            raise PolicyDataError(f"{len(held_out)} problems come from held-out seeds (e.g. {held_out[0]}); "
                                  f"the policy is fine-tuned on training seeds only")

    if not (args.sft or args.input or args.pairs):
        print("forest train-policy: give --sft, --input or --pairs (or --sft/--input with --pairs)", file=sys.stderr)
        return EXIT_USAGE
    # settings without an argparse default (SUPPRESS) are in ``args`` only when given
    dpo_settings = {name: value for name, value in vars(args).items() if name in ("beta", "sft_weight")}
    lines_need = "needs --input (the build outputs whose lines it {})"
    for flag, given, satisfied, need in (
            ("--skip-solved", args.skip_solved, args.input, lines_need.format("selects")),
            ("--outcome-pairs", args.outcome_pairs, args.input, lines_need.format("pairs")),
            ("--lines-per-problem", "lines_per_problem" in vars(args), args.input, lines_need.format("caps")),
            ("--step-check", "step_check" in vars(args), args.input, lines_need.format("checks")),
            *(("--" + name.replace("_", "-"), True, args.pairs or args.outcome_pairs,
               "is a setting of the DPO pass: give --pairs or --outcome-pairs") for name in dpo_settings)):
        if given and not satisfied:
            print(f"forest train-policy: {flag} {need}", file=sys.stderr)
            return EXIT_USAGE
    start = args.base
    try:
        if not (Path(args.base) / "config.json").is_file():
            raise FileNotFoundError(f"--base {args.base}: not a model directory (no config.json)")
        pairs = read_pairs(args.pairs) if args.pairs else None  # a bad file fails before any training
        if pairs:
            training_seeds_only(row["problem_id"] for row in pairs)
        lines = None
        if args.sft or args.input:
            tokenizer = AutoTokenizer.from_pretrained(args.base)
            if args.sft:
                examples = sft_examples(read_sft(args.sft), tokenizer)
            else:
                lines = read_value_examples(args.input)
                training_seeds_only(e.problem_id for e in lines)
                examples = line_examples(lines, tokenizer, skip_solved=args.skip_solved,
                                         per_problem=getattr(args, "lines_per_problem",
                                                             policy_recipe.LINES_PER_PROBLEM), seed=args.seed,
                                         check=StepCheck(getattr(args, "step_check", StepCheck.OFF.value)))
            print(f"{len(examples)} right lines of {len({e.problem_id for e in examples})} problems", flush=True)
            report = train_policy(examples, base=args.base, output=args.output, seed=args.seed, epochs=args.epochs,
                                  batch_size=args.batch_size, lr=args.lr, keep=args.keep, threads=args.threads,
                                  device=args.device)
            print(json.dumps({k: report[k] for k in ("kept_step", "base_dev_loss", "dev_loss", "train_lines",
                                                     "dev_lines", "seconds")}), flush=True)
            start = args.output
        if pairs or args.outcome_pairs:
            tokenizer = AutoTokenizer.from_pretrained(start)
            examples = outcome_pairs(lines, tokenizer) if args.outcome_pairs else pair_examples(pairs, tokenizer)
            print(f"{len(examples)} preference pairs of {len({e.problem_id for e in examples})} problems", flush=True)
            report = train_dpo(examples, base=start, output=args.output, seed=args.seed, epochs=args.epochs,
                               batch_size=args.batch_size, lr=args.lr, threads=args.threads, device=args.device,
                               **dpo_settings)
            print(json.dumps({k: report.get(k) for k in ("kept_step", "base_dev_loss", "dev_loss",
                                                         "dev_pair_accuracy", "train_pairs", "dev_pairs",
                                                         "seconds")}))
    except (SftDataError, PairsDataError, ValueDataError, PolicyDataError, FileNotFoundError) as exc:
        print(f"forest train-policy: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def cmd_eval(args) -> int:
    from dataset.problems import read_problems
    from deploy.evaluate import (EvalError, format_markdown, format_table, parse_budgets, parse_strategies, plot,
                                 report_json, run_eval)

    config = load(args)
    try:
        strategies = parse_strategies(args.strategies)
        budgets = parse_budgets(args.budgets) if args.budgets else [args.budget_tokens or config.search.budget_tokens]
        if budgets[0] is None:
            raise EvalError("--budget-tokens or --budgets is required (or search.budget_tokens in the config)")
        problems, errors = read_problems(args.input)
        for error in errors:
            print(f"forest eval: skipped {error.problem_id}: {error.message}", file=sys.stderr)
        on_report = (lambda r: print(report_json(r), flush=True)) if args.json else None
        reports = run_eval(config, problems[:args.limit], strategies, budgets=budgets, concurrency=args.concurrency,
                           on_report=on_report)
    except EvalError as exc:
        print(f"forest eval: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not args.json:
        print(f"{reports[0].problems} problems from {args.input}, budgets {budgets} generated tokens per problem, "
              f"model {config.engine.model} ({config.engine.dtype})")
        print(format_markdown(reports) if args.markdown else format_table(reports))
    if args.budgets:
        print("plot: " + ", ".join(plot(reports, args.plot)), file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_model_report(args) -> int:
    from deploy.model_report import format_report, plot_report, report_json, report_title, run_model_report
    from modelkit.arithmetic import make_problems

    if args.n < 1 or args.samples < 1:
        print(f"forest model-report: --n and --samples must be >= 1, got {args.n} and {args.samples}",
              file=sys.stderr)
        return EXIT_USAGE
    dist = parse_distribution(args, "model-report")
    if dist is None:
        return EXIT_USAGE
    config = load(args)
    report = run_model_report(config, make_problems(args.n, args.seed, dist), samples=args.samples)
    print(report_json(report) if args.json else
          f"model {config.engine.model} ({config.engine.dtype}), problems from seed {args.seed}\n"
          + format_report(report))
    if args.plot:
        title = report_title(config.engine.model, report.overall.problems, args.seed)
        print("plot: " + ", ".join(plot_report(report, args.plot, title=title)),
              file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_training_curves(args) -> int:
    from modelkit.train import plot_runs, read_report

    runs = {}
    for spec in args.runs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            print(f"forest training-curves: expected LABEL=PATH, got {spec!r}", file=sys.stderr)
            return EXIT_USAGE
        if label in runs:
            print(f"forest training-curves: the label {label!r} is given twice", file=sys.stderr)
            return EXIT_USAGE
        try:
            runs[label] = read_report(path)
        except ValueError as e:
            print(f"forest training-curves: {e}", file=sys.stderr)
            return EXIT_USAGE
    print("plot: " + ", ".join(map(str, plot_runs(runs, args.plot))))
    return 0


def cmd_bench(args) -> int:
    from cluster.config import load_config
    from bench.benchmarks import run_bench

    for flag in ("repeats", "steps", "batch_size", "micro_batches"):
        if getattr(args, flag) < 1:
            print(f"forest bench: --{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}",
                  file=sys.stderr)
            return 2
    dist = parse_distribution(args, "bench")
    if dist is None:
        return 2
    config = load_config(args.config, **{"engine.model": args.model})
    figures = run_bench(args.bench, config, problems=args.problems, trees=args.trees, active=args.active,
                        block_sizes=[int(b) for b in args.block_sizes.split(",")], granularity=args.granularity,
                        managers=[int(m) for m in args.managers.split(",")], per_token_problems=args.per_token_problems,
                        repeats=args.repeats, train_steps=args.steps, batch_size=args.batch_size,
                        micro_batches=args.micro_batches, device=args.device, dist=dist)
    for figure in figures:
        print(figure.line(args.json), flush=True)
    return 0


def cmd_search(args) -> int:
    import asyncio

    from actors.pool import open_pool
    from search.prompts import prompt_token_ids
    from search.strategies import get_strategy

    config = load(args)
    strategy = get_strategy(args.strategy)
    params = config.search.to_params(**strategy.preset)
    scores = needs_value_model(strategy, params)
    if scores and config.value_model is None:
        print(f"forest search: {strategy.name} with value {params.value.value} needs a value model: set "
              f"value_model.model in the config or pass --value-model", file=sys.stderr)
        return EXIT_USAGE
    with open_pool(config, value=scores) as pool:
        prompt = prompt_token_ids(pool.tokenizer, args.question, system_prompt=config.search.system_prompt)
        result = asyncio.run(pool.worker_pool().search(strategy, pool.tokenizer, prompt, params))
    summary = {"answer": result.answer, "response": result.response, "value": result.value,
               "iterations": result.stats.iterations, "nodes": result.tree.num_nodes,
               "tokens": result.stats.generated_tokens, "seconds": result.stats.seconds,
               "stop_reason": result.stop_reason.value}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"answer: {result.answer}\n\n{result.response}\n\n"
              f"({result.stats.iterations} iterations, {result.tree.num_nodes} nodes, "
              f"{result.stats.generated_tokens} tokens, {result.stats.seconds:.1f}s, "
              f"stop: {result.stop_reason.value})")
    return 0


def cmd_serve(args) -> int:
    from deploy.serve import run_forever
    run_forever(load(args))
    return 0


def cmd_view(args) -> int:
    from dataset.reader import read_manifest
    from deploy.viewer import tree_from_output, tree_page, write_build_view
    try:
        if args.tree is None:
            if read_manifest(args.output) is None:
                raise ValueError(f"no Forest build at {args.output} (it has no manifest.json)")
            print(write_build_view(args.output, args.html or DEFAULT_VIEW_FOLDER))
            return 0
        tree, meta = tree_from_output(args.output, args.tree)
    except (KeyError, ValueError) as exc:
        print(f"forest view: {exc}", file=sys.stderr)
        return EXIT_USAGE
    path = args.html or f"tree-{args.tree}.html"
    with open(path, "w", encoding="utf-8") as f:
        f.write(tree_page(tree, title=f"tree {args.tree}", meta=meta))
    print(path)
    return 0


def cmd_build(args) -> int:
    from deploy.build import cmd_build as build
    return build(args)


COMMANDS = {"make-model": cmd_make_model, "make-problems": cmd_make_problems, "eval": cmd_eval,
            "train-value": cmd_train_value, "train-verifier": cmd_train_verifier, "train-policy": cmd_train_policy,
            "model-report": cmd_model_report, "training-curves": cmd_training_curves, "bench": cmd_bench,
            "build": cmd_build, "search": cmd_search, "serve": cmd_serve, "view": cmd_view}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run(args.command, COMMANDS[args.command], args)


if __name__ == "__main__":
    sys.exit(main())
