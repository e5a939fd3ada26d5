"""GeneratorWorker: the Ray actor that owns one vLLM engine (``actors.vllm_engine.VLLMEngine``).

Started and reached through ``actors.pool`` (``start_generator_workers``, ``RemoteEngine``).
"""

from __future__ import annotations

import asyncio
import logging
import os

from actors.vllm_engine import VLLMEngine, WorkerStats
from cluster.config import EngineConfig
from search.protocol import Chunk, EngineDeadError, GenerationRequest

log = logging.getLogger(__name__)

EXIT_DELAY_SECONDS = 0.2
"""After its engine dies the worker exits this long after answering, so the caller hears why first."""


def exit_for_restart(engine: str) -> None:
    """After ``engine`` died: exit shortly (once the caller has heard why), so that Ray restarts the actor with a
    fresh engine; the caller re-sends the request."""
    log.error("%s died; restarting the worker", engine)
    asyncio.get_running_loop().call_later(EXIT_DELAY_SECONDS, os._exit, 1)


class GeneratorWorker:
    """One vLLM engine as a Ray actor; a dead engine makes the actor exit, and Ray restarts it (``max_restarts``)."""

    def __init__(self, config: EngineConfig, seed: int, device: str):
        self.engine = VLLMEngine(config, seed=seed, device=device)

    async def generate(self, request: GenerationRequest) -> list[Chunk]:
        try:
            return await self.engine.generate(request)
        except EngineDeadError:
            exit_for_restart("engine")
            raise

    def stats(self) -> WorkerStats:
        return self.engine.stats()

    def engine_settings(self) -> dict:
        return self.engine.settings()

    async def check_health(self) -> bool:
        await self.engine.check_health()
        return True

    async def reset_prefix_cache(self) -> None:
        await self.engine.reset_prefix_cache()

    def shutdown(self) -> None:
        self.engine.shutdown()
