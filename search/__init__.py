"""Forest's pure search core: Marco-o1 MCTS over an abstract engine. No Ray, no vLLM, no I/O.

The SIMULATED engine for unit tests and the manager benchmark lives in ``search.simulated`` and is not part of
this surface.
"""

from search.baselines import best_of_n, greedy, self_consistency
from search.confidence import mean_confidence, token_confidence
from search.driver import SearchError, SearchResult, SearchStats, StopReason, run_mcts
from search.params import (Budget, ConfigError, FinalChoice, Granularity, MCTSParams, ReflectionPolicy, StepCheck,
                           ValueKind)
from search.prompts import DEFAULT_SYSTEM_PROMPT, REFLECTION_PHRASE, answers_match, build_prompt, extract_answer
from search.protocol import (TOP_K, Chunk, Engine, EngineDeadError, EngineError, FinishReason, GenerationRequest,
                             Tokenizer)
from search.strategies import STRATEGIES, Strategy, get_strategy
from search.tree import ROOT, NodeKind, Tree

__all__ = [
    "Budget", "Chunk", "ConfigError", "DEFAULT_SYSTEM_PROMPT", "Engine", "EngineDeadError", "EngineError",
    "FinalChoice", "FinishReason", "GenerationRequest", "Granularity", "MCTSParams", "NodeKind", "REFLECTION_PHRASE",
    "ROOT", "ReflectionPolicy", "STRATEGIES", "SearchError", "SearchResult", "SearchStats", "StepCheck", "StopReason",
    "Strategy", "TOP_K", "Tokenizer", "Tree", "ValueKind", "answers_match", "best_of_n", "build_prompt",
    "extract_answer", "get_strategy", "greedy", "mean_confidence", "run_mcts", "self_consistency", "token_confidence",
]
