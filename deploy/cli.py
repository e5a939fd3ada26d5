"""The ``forest`` command line: each subcommand only wires parts together."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pydantic import ValidationError

from deploy.bench import BENCHES
from deploy.evaluate import STRATEGIES
from search.params import ConfigError


def _count_or_auto(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by commands that run searches; each overrides the config file."""
    p.add_argument("--config", help="YAML config (see deploy/build.cpu.yaml); flags below override it")
    p.add_argument("--model", help="model directory (engine.model)")
    p.add_argument("--workers", type=_count_or_auto, help="GeneratorWorkers (vLLM engines) to start, or auto")
    p.add_argument("--iterations", type=int, help="MCTS iterations per tree (search.iterations)")
    p.add_argument("--granularity", help="step | mini_step:N (search.granularity)")
    p.add_argument("--max-tokens", type=int, dest="max_tokens",
                   help="most generated tokens along one reasoning path (search.max_path_tokens)")
    p.add_argument("--budget-tokens", type=int, dest="budget_tokens",
                   help="generated-token budget per tree, never exceeded (search.budget_tokens)")
    p.add_argument("--reflection", help="off | always | below:<value> | wrong_answer (search.reflection)")


def _overrides(args: argparse.Namespace) -> dict:
    return {"engine.model": args.model, "workers": args.workers, "search.iterations": args.iterations,
            "search.granularity": args.granularity, "search.max_path_tokens": args.max_tokens,
            "search.budget_tokens": args.budget_tokens, "search.reflection": args.reflection,
            "build.input": getattr(args, "input", None), "build.output": getattr(args, "output", None),
            "build.managers": getattr(args, "managers", None), "build.limit": getattr(args, "limit", None),
            "serve.host": getattr(args, "host", None), "serve.port": getattr(args, "port", None)}


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

    build = sub.add_parser("build", help="build a dataset of search trees from a problems file (resumable)")
    _add_run_flags(build)
    build.add_argument("--input", help="problems: JSONL or Parquet with id, question, optional answer")
    build.add_argument("--output", help="output directory or filesystem URI (s3://...)")
    build.add_argument("--managers", type=_count_or_auto, help="TreeManager actors (build.managers), or auto")
    build.add_argument("--limit", type=int, help="build at most this many problems")

    search = sub.add_parser("search", help="search one question and print the answer and the chosen path")
    _add_run_flags(search)
    search.add_argument("question", help="the question to reason about")
    search.add_argument("--json", action="store_true", help="print the result as JSON")
    srv = sub.add_parser("serve", help="run the OpenAI-compatible reasoning endpoint until Ctrl-C")
    _add_run_flags(srv)
    srv.add_argument("--host", help="bind address (serve.host, default 127.0.0.1)")
    srv.add_argument("--port", type=int, help="HTTP port (serve.port, default 8000)")
    ev = sub.add_parser("eval", help="compare search strategies' accuracy on problems with answers, at one budget")
    _add_run_flags(ev)
    ev.add_argument("--input", required=True, help="problems with answers: JSONL or Parquet")
    ev.add_argument("--strategies", default=",".join(STRATEGIES),
                    help=f"comma-separated, from {', '.join(STRATEGIES)}")
    ev.add_argument("--limit", type=int, help="evaluate only the first N problems")
    ev.add_argument("--concurrency", type=int, default=64, help="problems searched at once")
    ev.add_argument("--json", action="store_true", help="print one JSON line per strategy instead of a table")
    ev.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    bench = sub.add_parser("bench", help="performance benchmarks, printed as ratios measured in one run")
    bench.add_argument("bench", choices=BENCHES, help="which benchmark (see docs/benchmarks.md)")
    bench.add_argument("--config", default="deploy/build.cpu.yaml",
                       help="engine and search settings (the real-engine benches)")
    bench.add_argument("--model", help="model directory (engine.model)")
    bench.add_argument("--problems", type=int, default=32, help="trees searched by engine, designs and cache")
    bench.add_argument("--per-token-problems", type=int, default=4,
                       help="designs: trees the (slow) one-call-per-token loop searches")
    bench.add_argument("--block-sizes", default="32,128", help="cache: KV block sizes to compare")
    bench.add_argument("--trees", type=int, default=400, help="manager: trees per manager")
    bench.add_argument("--active", type=int, default=1000, help="manager/memory: trees active at once")
    bench.add_argument("--granularity", default="mini_step:64", help="manager/memory: action granularity")
    bench.add_argument("--managers", default="1,2,4", help="manager: manager counts to run")
    bench.add_argument("--json", action="store_true", help="one JSON line per figure")
    view = sub.add_parser("view", help="write a self-contained HTML page drawing one tree of a build")
    view.add_argument("output", metavar="OUT", help="a build's output directory or URI")
    view.add_argument("--tree", required=True, metavar="ID", help="tree_id (see OUT/trees)")
    view.add_argument("--html", metavar="FILE", help="where to write the page (default tree-ID.html)")
    return root


def _load(args):
    from cluster.config import load_config
    return load_config(args.config, **_overrides(args))


def cmd_make_model(args) -> int:
    from deploy.make_model import make_tiny_random
    print(make_tiny_random(args.tiny_random, seed=args.seed))
    return 0


def cmd_make_problems(args) -> int:
    from deploy.arithmetic import write_problems
    if args.n < 1:
        print(f"forest make-problems: --n must be >= 1, got {args.n}", file=sys.stderr)
        return 2
    print(write_problems(args.output, args.n, args.seed))
    return 0


def cmd_eval(args) -> int:
    from deploy.evaluate import EvalError, format_markdown, format_table, parse_strategies, report_json, run_eval
    from deploy.problems import read_problems

    config = _load(args)
    try:
        strategies = parse_strategies(args.strategies)
        budget = args.budget_tokens or config.search.budget_tokens
        if budget is None:
            raise EvalError("--budget-tokens is required (or search.budget_tokens in the config)")
        problems, errors = read_problems(args.input)
        for error in errors:
            print(f"forest eval: skipped {error.problem_id}: {error.message}", file=sys.stderr)
        on_report = (lambda r: print(report_json(r), flush=True)) if args.json else None
        reports = run_eval(config, problems[:args.limit], strategies, budget_tokens=budget,
                           concurrency=args.concurrency, on_report=on_report)
    except EvalError as exc:
        print(f"forest eval: {exc}", file=sys.stderr)
        return 2
    if not args.json:
        print(f"{reports[0].problems} problems from {args.input}, "
              f"budget {budget} generated tokens per problem, model {config.engine.model}")
        print(format_markdown(reports) if args.markdown else format_table(reports))
    return 0


def cmd_bench(args) -> int:
    from cluster.config import load_config
    from deploy.bench import run_bench

    config = load_config(args.config, **{"engine.model": args.model})
    figures = run_bench(args.bench, config, problems=args.problems, trees=args.trees, active=args.active,
                        block_sizes=[int(b) for b in args.block_sizes.split(",")], granularity=args.granularity,
                        managers=[int(m) for m in args.managers.split(",")], per_token_problems=args.per_token_problems)
    for figure in figures:
        print(figure.line(args.json), flush=True)
    return 0


def cmd_build(args) -> int:
    from deploy.build import BuildError, print_summary, run_build
    try:
        summary = run_build(_load(args))
    except BuildError as exc:
        print(f"forest build: {exc}", file=sys.stderr)
        return 2
    print_summary(summary)
    return 0


def cmd_search(args) -> int:
    from deploy.search_one import search_one
    result = search_one(_load(args), args.question)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"answer: {result['answer']}\n\n{result['response']}\n\n"
              f"({result['iterations']} iterations, {result['nodes']} nodes, {result['tokens']} tokens, "
              f"{result['seconds']:.1f}s, stop: {result['stop_reason']})")
    return 0


def cmd_serve(args) -> int:
    from deploy.serve import run_forever
    run_forever(_load(args))
    return 0


def cmd_view(args) -> int:
    from deploy.viewer import render, tree_from_output
    try:
        tree, answer = tree_from_output(args.output, args.tree)
    except (KeyError, ValueError) as exc:
        print(f"forest view: {exc}", file=sys.stderr)
        return 2
    path = args.html or f"tree-{args.tree}.html"
    with open(path, "w", encoding="utf-8") as f:
        f.write(render(tree, title=f"tree {args.tree}", answer=answer))
    print(path)
    return 0


COMMANDS = {"make-model": cmd_make_model, "make-problems": cmd_make_problems, "eval": cmd_eval, "bench": cmd_bench,
            "build": cmd_build, "search": cmd_search, "serve": cmd_serve,
            "view": cmd_view}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValidationError, ConfigError) as exc:
        print(f"forest {args.command}: invalid configuration:\n{exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
