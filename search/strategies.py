"""The strategy registry: every way Forest answers a problem, by name, behind one signature.

A strategy is ``async (engine, tokenizer, prompt_token_ids, params, *, reference, request_prefix, on_progress)
-> SearchResult``. ``params`` (an ``MCTSParams``) carries everything a strategy may need: the longest path
(``max_path_tokens``), the budget, the sampling settings and, for MCTS, the tree's shape. ``forest eval``, the
Serve endpoint (model ``forest-<name>``), ``forest build`` and ``forest bench`` all look strategies up here, so
adding one is one entry in ``STRATEGIES``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

from search.baselines import best_of_n, best_of_n_prm, greedy, self_consistency
from search.driver import ProgressCallback, SearchResult, run_mcts
from search.params import ConfigError, MCTSParams
from search.protocol import Engine, Tokenizer
from search.values import SCORED_VALUES

SearchFunction = Callable[..., Awaitable[SearchResult]]
"""``(engine, tokenizer, prompt_token_ids, params, *, reference=None, request_prefix="", on_progress=None)``."""


@dataclass(frozen=True, slots=True)
class Strategy:
    """A named way to answer. ``granularity`` and ``value``: what an MCTS preset fixes (``None``: the configured
    ones); ``preset`` gives them to ``SearchConfig.to_params``."""

    name: str
    search: SearchFunction
    description: str
    granularity: str | None = None
    value: str | None = None
    one_line: bool = False  # the search draws a single line, so it has no alternatives to offer (``n`` > 1)

    @property
    def preset(self) -> dict:
        return {"granularity": self.granularity, "value": self.value}

    async def __call__(self, engine: Engine, tokenizer: Tokenizer, prompt_token_ids: Sequence[int],
                       params: MCTSParams, *, reference: str | None = None, request_prefix: str = "",
                       on_progress: ProgressCallback | None = None) -> SearchResult:
        return await self.search(engine, tokenizer, prompt_token_ids, params, reference=reference,
                                 request_prefix=request_prefix, on_progress=on_progress)


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("greedy", greedy, "one chain of thought at temperature 0", one_line=True),
    Strategy("best_of_n", best_of_n, "as many sampled answers as the token budget affords; the most confident"),
    Strategy("self_consistency", self_consistency, "as many sampled answers as the budget affords; majority vote"),
    Strategy("mcts", run_mcts, "Marco-o1 MCTS at the configured granularity"),
    Strategy("mcts-step", run_mcts, "Marco-o1 MCTS, one reasoning step per action", "step"),
    Strategy("mcts-mini64", run_mcts, "Marco-o1 MCTS, 64-token mini-steps", "mini_step:64"),
    Strategy("mcts-mini32", run_mcts, "Marco-o1 MCTS, 32-token mini-steps", "mini_step:32"),
    Strategy("best_of_n-prm", best_of_n_prm, "as many samples as the budget affords; votes weighted by the value "
                                             "model's scores"),
    Strategy("mcts-prm", run_mcts, "MCTS, one reasoning step per action, each rollout's finished line valued by the "
                                   "value model", "step", "reward_model_rollout"),
)}

VALUE_MODEL_STRATEGIES = frozenset({"best_of_n-prm", "mcts-prm"})
"""The strategies that need a value model (``value_model`` in the config) whatever the configured value."""


def needs_value_model(strategy: Strategy, params: MCTSParams) -> bool:
    """Whether running ``strategy`` with ``params`` (the preset applied) asks a value model for scores."""
    return strategy.name in VALUE_MODEL_STRATEGIES or (strategy.search is run_mcts and params.value in SCORED_VALUES)

EVAL_STRATEGIES = ("greedy", "best_of_n", "self_consistency", "mcts-step", "mcts-mini64", "mcts-mini32")
"""What ``forest eval`` compares by default: the baselines and Marco-o1's three granularities."""


def get_strategy(name: str) -> Strategy:
    """The registered strategy ``name``; ``ConfigError`` naming the choices otherwise."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ConfigError("strategy", name, f"choose from {', '.join(STRATEGIES)}") from None
