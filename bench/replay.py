"""``ReplayWorker``: a GeneratorWorker that can also replay requests straight into its engine (plain vLLM).

``forest bench engine`` compares Forest's dispatch against this replay of the very same requests on the very same
engine; production code never starts it.
"""

from __future__ import annotations

import asyncio
import time

from actors.generator import GeneratorWorker
from search.protocol import GenerationRequest


class ReplayWorker(GeneratorWorker):
    async def replay(self, requests: list[GenerationRequest], concurrency: int) -> dict:
        """Run ``requests`` straight into the engine, ``concurrency`` at a time, from a cold prefix cache (the
        engine's limit, which ``forest bench engine`` compares the search against)."""
        await self.engine.reset_prefix_cache()
        gate = asyncio.Semaphore(concurrency)

        async def one(request):
            async with gate:
                return await self.engine.generate(request)

        start = time.monotonic()
        results = await asyncio.gather(*(one(r) for r in requests))
        return {"seconds": time.monotonic() - start, "generated_tokens": sum(len(c) for cs in results for c in cs)}
