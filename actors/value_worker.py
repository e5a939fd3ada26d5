"""ValueWorker: the Ray actor that owns one value model: a reward model on vLLM's pooling runner
(``actors.vllm_engine.VLLMScorer``), or a verifier read by likelihood (``VLLMLikelihood``, ``value_likelihood`` in
the config).

Started, placed and restarted like a GeneratorWorker (``actors.pool``); searches reach it through
``WorkerPool.score``. It has an engine of its own, so a value request never waits behind generations. With a
``ValueInput`` (``value_input`` in the config) it renders each request in its PRM's own format first
(``actors.value_input``).
"""

from __future__ import annotations

import asyncio

import numpy as np

from actors.generator import exit_for_restart, watch_engine
from actors.value_input import Likelihood, LikelihoodInput, PRMInput, ValueInput
from actors.vllm_engine import VLLMLikelihood, VLLMScorer, process_ids
from cluster.config import EngineConfig
from cluster.cpus import pin_engine
from search.protocol import EngineDeadError, ScoreRequest


class ValueWorker:
    """One value model as a Ray actor; a dead engine makes the actor exit, and Ray restarts it."""

    def __init__(self, config: EngineConfig, seed: int, device: str, cpu_slot: tuple[int, int] | None = None,
                 value_input: ValueInput | None = None, likelihood: Likelihood | None = None):
        self.input = None if value_input is None else PRMInput(value_input, config.model)
        if likelihood is None:
            self.scorer = VLLMScorer(config, seed=seed, device=device)
        else:
            self.scorer = VLLMLikelihood(config, LikelihoodInput(likelihood, config.model), seed=seed, device=device)
        self.cpu_core = None if cpu_slot is None else pin_engine(*cpu_slot)  # as GeneratorWorker
        self._watch: asyncio.Task | None = None  # watch_engine, from the first check_health

    async def score(self, request: ScoreRequest) -> np.ndarray:
        try:
            return await self.scorer.score(request if self.input is None else self.input.render(request))
        except EngineDeadError:
            exit_for_restart("value engine")
            raise

    def engine_settings(self) -> dict:
        return {**self.scorer.settings(), "cpu_core": self.cpu_core}

    def process_ids(self) -> tuple[int, tuple[int, ...]]:
        """(the worker's pid, its engine processes' pids)."""
        return process_ids()

    async def check_health(self) -> bool:
        """The engine answers; the first call (every pool makes it before sending work) starts the watch."""
        self._watch = self._watch or watch_engine(self.scorer.engine, "value engine")
        await self.scorer.check_health()
        return True

    def shutdown(self) -> None:
        self.scorer.shutdown()
