"""GeneratorWorker: the Ray actor that owns one vLLM engine (``actors.vllm_engine.VLLMEngine``).

Started and reached through ``actors.pool`` (``start_generator_workers``, ``RemoteEngine``).
"""

from __future__ import annotations

import asyncio
import logging
import os

from actors.vllm_engine import VLLMEngine, WorkerStats
from cluster.config import EngineConfig
from cluster.cpus import pin_engine
from search.protocol import Chunk, EngineDeadError, GenerationRequest

log = logging.getLogger(__name__)

EXIT_DELAY_SECONDS = 0.2
"""After its engine dies the worker exits this long after answering, so the caller hears why first."""
WATCH_SECONDS = 2.0
"""How often a worker asks its vLLM engine whether it died (see ``watch_engine``)."""


def exit_for_restart(engine: str) -> None:
    """After ``engine`` died: exit shortly (once the caller has heard why), so that Ray restarts the actor with a
    fresh engine; the caller re-sends the request."""
    log.error("%s died; restarting the worker", engine)
    asyncio.get_running_loop().call_later(EXIT_DELAY_SECONDS, os._exit, 1)


def watch_engine(engine, name: str) -> asyncio.Task:
    """Exit for a restart once the vLLM ``engine`` (an ``AsyncLLM``) reports itself dead, even if no request
    noticed: a request that reached the engine just as its core process died can wait for ever (seen on the pooling
    runner), and the actor's exit fails it, so the caller re-sends it to a restarted worker."""

    async def watch() -> None:
        while not engine.errored:
            await asyncio.sleep(WATCH_SECONDS)
        exit_for_restart(name)

    return asyncio.ensure_future(watch())


class GeneratorWorker:
    """One vLLM engine as a Ray actor; a dead engine makes the actor exit, and Ray restarts it (``max_restarts``)."""

    def __init__(self, config: EngineConfig, seed: int, device: str, cpu_slot: tuple[int, int] | None = None):
        """``cpu_slot``: (this engine's start order on its node, CPU engines there) to pin it by
        (``cluster.cpus``); None: not pinned."""
        self.engine = VLLMEngine(config, seed=seed, device=device)
        self.cpu_core = None if cpu_slot is None else pin_engine(*cpu_slot)
        self._watch: asyncio.Task | None = None  # watch_engine, from the first check_health

    async def generate(self, request: GenerationRequest) -> list[Chunk]:
        try:
            return await self.engine.generate(request)
        except EngineDeadError:
            exit_for_restart("engine")
            raise

    def stats(self) -> WorkerStats:
        return self.engine.stats()

    def engine_settings(self) -> dict:
        return {**self.engine.settings(), "cpu_core": self.cpu_core}

    async def check_health(self) -> bool:
        """The engine answers; the first call (every pool makes it before sending work) starts the watch."""
        self._watch = self._watch or watch_engine(self.engine.engine, "engine")
        await self.engine.check_health()
        return True

    async def reset_prefix_cache(self) -> None:
        await self.engine.reset_prefix_cache()

    def shutdown(self) -> None:
        self.engine.shutdown()
