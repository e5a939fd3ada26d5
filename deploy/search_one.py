"""``forest search QUESTION``: one tree on a local (or attached) Ray cluster, printed."""

from __future__ import annotations

import asyncio

from cluster.config import ForestConfig


def search_one(config: ForestConfig, question: str) -> dict:
    import ray

    from actors.generator import start_generator_workers
    from actors.tokenizer import HFTokenizer
    from actors.tree_manager import TreeEngine, WorkerPool
    from cluster.placement import resolve_auto
    from cluster.runtime import connect
    from search.driver import run_mcts
    from search.prompts import build_prompt

    connect()
    config = resolve_auto(config)
    workers = start_generator_workers(config.engine, config.workers)
    tokenizer = HFTokenizer(config.engine.model)
    prompt = tokenizer.encode(build_prompt(question, system_prompt=config.search.system_prompt))

    async def go():
        engine = TreeEngine(WorkerPool(workers, max_in_flight=128))
        return await run_mcts(engine, tokenizer, prompt, config.search.to_params())

    try:
        result = asyncio.run(go())
    finally:
        for w in workers:
            ray.kill(w)
    return {"answer": result.answer, "response": result.response, "value": result.value,
            "iterations": result.stats.iterations, "nodes": result.tree.num_nodes,
            "tokens": result.stats.generated_tokens, "seconds": result.stats.seconds,
            "stop_reason": result.stop_reason.value}
