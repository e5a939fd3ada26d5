"""Command-line flags shared by the ``forest`` CLI and the ``python -m deploy.build`` job entrypoint.

Each flag overrides one config field (named in its help); ``load`` reads the config with the flags applied.
``run`` executes a command with logging set up and configuration errors reported as such (exit status 2).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

DEFAULT_CONFIG = "deploy/configs/build.cpu.yaml"
EXIT_USAGE = 2  # bad flags, bad config, unusable input or output


def count_or_auto(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by commands that run searches; each overrides the config file."""
    p.add_argument("--config", help=f"YAML config (see {DEFAULT_CONFIG}); flags below override it")
    p.add_argument("--model", help="model directory (engine.model)")
    p.add_argument("--workers", type=count_or_auto, help="GeneratorWorkers (vLLM engines) to start, or auto")
    p.add_argument("--iterations", type=int, help="MCTS iterations per tree (search.iterations)")
    p.add_argument("--granularity", help="step | mini_step:N (search.granularity)")
    p.add_argument("--max-path-tokens", "--max-tokens", type=int, dest="max_path_tokens",
                   help="most generated tokens along one reasoning path (search.max_path_tokens)")
    p.add_argument("--budget-tokens", type=int, dest="budget_tokens",
                   help="generated-token budget per tree, never exceeded (search.budget_tokens)")
    p.add_argument("--reflection", help="off | always | below:<value> | wrong_answer (search.reflection)")
    p.add_argument("--temperature", type=float, help="sampling temperature of every sampling strategy "
                                                      "(search.temperature)")
    p.add_argument("--exploration", type=float, help="UCT exploration constant (search.exploration)")
    p.add_argument("--step-check", dest="step_check", help="off | arithmetic: a tool that verifies each step "
                                                          "(search.step_check)")
    p.add_argument("--retry-temperature", type=float, dest="retry_temperature",
                   help="temperature of a tree search's samples after a step failed the check "
                        "(search.retry_temperature)")
    p.add_argument("--min-step-score", type=float, dest="min_step_score",
                   help="with a value model: a step it scores below this fails like a step_check failure "
                        "(search.min_step_score)")
    p.add_argument("--stop-when-right", action="store_true", default=None, dest="stop_when_right",
                   help="end each tree at its first finished line that answers the problem's reference and passes "
                        "the step check (search.stop_when_right; data builds)")
    p.add_argument("--value", help="how a state is valued, e.g. line_confidence or reward_model (search.value)")
    p.add_argument("--value-model", dest="value_model", help="value model directory (value_model.model): a reward "
                   "model, or a causal LM served as a verifier by likelihood (value_likelihood)")


def add_build_flags(p: argparse.ArgumentParser) -> None:
    """``forest build`` and ``python -m deploy.build``."""
    add_run_flags(p)
    p.add_argument("--input", help="problems: JSONL or Parquet with id, question, optional answer")
    p.add_argument("--output", help="output directory or filesystem URI (s3://...)")
    p.add_argument("--managers", type=count_or_auto, help="TreeManager actors (build.managers), or auto")
    p.add_argument("--limit", type=int, help="build at most this many problems")
    p.add_argument("--strategy", help="what each tree runs, e.g. mcts-step or best_of_n (build.strategy)")


def overrides(args: argparse.Namespace) -> dict:
    return {"engine.model": args.model, "workers": args.workers, "search.iterations": args.iterations,
            "search.granularity": args.granularity, "search.max_path_tokens": args.max_path_tokens,
            "search.budget_tokens": args.budget_tokens, "search.reflection": args.reflection,
            "search.temperature": args.temperature, "search.exploration": args.exploration,
            "search.value": args.value, "value_model.model": args.value_model,
            "search.step_check": args.step_check, "search.retry_temperature": args.retry_temperature,
            "search.min_step_score": args.min_step_score,
            "search.stop_when_right": args.stop_when_right,
            "build.input": getattr(args, "input", None), "build.output": getattr(args, "output", None),
            "build.managers": getattr(args, "managers", None), "build.limit": getattr(args, "limit", None),
            "build.strategy": getattr(args, "strategy", None),
            "serve.host": getattr(args, "host", None), "serve.port": getattr(args, "port", None)}


def load(args: argparse.Namespace):
    from cluster.config import load_config
    return load_config(args.config, **overrides(args))


def run(name: str, command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``command(args)`` with logging on; an invalid configuration is reported (naming the field), exit 2."""
    from pydantic import ValidationError

    from search.params import ConfigError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return command(args)
    except (ValidationError, ConfigError) as exc:
        print(f"forest {name}: invalid configuration:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
